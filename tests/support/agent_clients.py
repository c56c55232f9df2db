"""The real agent clients, pinned, from npm: Claude Code and Codex CLI.

`install()` puts both into a cached npm prefix (under the tests' model cache
directory, so a second run reuses it) with `npm install --prefix`; the
suite installs them itself (`tests/conftest.py`, session fixture
`agent_clients`). `claude()` and `codex()` run one non-interactive session
against a kvrouter endpoint, in a scratch git repository, with a private home
directory, no update checks and no non-essential traffic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.server import model_cache_dir

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"
CODEX = "@openai/codex@0.171.0"
INSTALL_TIMEOUT_S = 900
MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class AgentClients:
    """Paths of the installed `claude` and `codex` executables."""

    claude: Path
    codex: Path


def prefix_dir() -> Path:
    """The npm prefix of these exact versions (reused across runs)."""
    tag = "-".join(p.rsplit("@", 1)[1] for p in (CLAUDE_CODE, CODEX))
    return model_cache_dir() / f"agent-clients-{tag}"


def install() -> AgentClients:
    """Installs the pinned clients when they are not in `prefix_dir()` yet. Raises
    FileNotFoundError when npm is missing, CalledProcessError when npm fails."""
    prefix = prefix_dir()
    clients = AgentClients(prefix / "node_modules/.bin/claude", prefix / "node_modules/.bin/codex")
    if clients.claude.exists() and clients.codex.exists():
        return clients
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not on PATH; the agent client tests need it to install "
                                f"{CLAUDE_CODE} and {CODEX}")
    prefix.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel", "error",
                    CLAUDE_CODE, CODEX], check=True, timeout=INSTALL_TIMEOUT_S)
    return clients


def git(repo: Path, *args: str) -> str:
    """Runs git in `repo` with a fixed identity; returns stdout."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "kvrouter test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "kvrouter test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def scratch_repo(path: Path) -> Path:
    """A git repository with one commit, at `path`."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("# scratch\n")
    git(path, "add", "README.md")
    git(path, "commit", "-q", "-m", "initial commit")
    return path


def claude(clients: AgentClients, base_url: str, repo: Path, home: Path, prompt: str,
           timeout_s: float = 600, model: str = MODEL) -> subprocess.CompletedProcess:
    """`claude -p PROMPT` in `repo` against the Anthropic endpoint `base_url` (no /v1),
    asking for the served model `model` (also as the small fast model)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "ANTHROPIC_BASE_URL": base_url,
           "ANTHROPIC_API_KEY": "unused", "ANTHROPIC_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    return subprocess.run([str(clients.claude), "-p", prompt], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


def codex(clients: AgentClients, base_url: str, repo: Path, home: Path, prompt: str,
          timeout_s: float = 600, model: str = MODEL) -> subprocess.CompletedProcess:
    """`codex exec PROMPT` in `repo` against the Responses endpoint `base_url` + /v1."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "kvrouter"\ncheck_for_update_on_startup = false\n\n'
        f'[model_providers.kvrouter]\nname = "kvrouter"\nbase_url = "{base_url}/v1"\nwire_api = "responses"\n'
        'env_key = "KVROUTER_API_KEY"\n')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "CODEX_HOME": str(home),
           "KVROUTER_API_KEY": "unused"}
    return subprocess.run([str(clients.codex), "exec", "--skip-git-repo-check", prompt], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def served_tokenizer(base_url: str):
    """The router's own ModelTokenizer for the first worker behind `base_url` (its
    ModelInfo over gRPC), to find token positions in what a client sent."""
    import json
    import urllib.request

    import grpc

    from kvrouter.router.prompting import ModelTokenizer
    from kvrouter.router.worker_client import model_info_from_proto
    from kvrouter_proto import worker_pb2, worker_pb2_grpc

    with urllib.request.urlopen(base_url + "/v1/router/state", timeout=10) as resp:
        address = json.load(resp)["workers"][0]["address"]
    with grpc.insecure_channel(address) as channel:
        info = worker_pb2_grpc.WorkerStub(channel).GetModelInfo(worker_pb2.ModelInfoRequest(), timeout=30)
    return ModelTokenizer(model_info_from_proto(info))


def tokens_before(tokenizer, text: str, marker: str) -> int:
    """Prompt tokens that end before the first `marker` in the rendered prompt `text`."""
    (pos,) = tokenizer.positions.positions(text, tokenizer.encode(text), [text.index(marker)])
    return pos


def served_model(base_url: str) -> str:
    """The first model `base_url` serves (its /v1/models)."""
    import json
    import urllib.request

    with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as resp:
        return json.load(resp)["data"][0]["id"]
