"""The real agent clients against a real `kvrouter serve` with the default model:
Claude Code (`claude -p`) on /v1/messages and Codex CLI (`codex exec`) on
/v1/responses, pinned versions from npm (installed by the suite itself).

A recording proxy (tests/support/recorder.py) sits between client and server and
keeps what the client sent and what kvrouter answered; reuse is read from
kvrouter's own report (usage in the stream's last event) and token positions are
found with the router's own tokenizer. Prompts are short and the server caps
output (`--max-tokens-limit`), because Claude Code asks for 32,000 tokens; what a
client does when that cap cuts its output (Claude Code asks to continue, Codex
exits 1 with "Incomplete response") is not a kvrouter failure.

Claude Code's session sequence (one scratch git repository):
1. first session; 2. another first prompt: reuses at least the system block;
3. after a `git commit` (its git status, at the end of the system text, changed):
   reuses at least everything before that environment block;
4. the session after: reuses the anchor session 3 refreshed.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pytest

from kvrouter.router.client_hints import remove_billing_header
from kvrouter.router.views.anthropic import parse_messages_request
from kvrouter.router.views.responses import parse_responses_request
from kvrouter.worker.launch import module_command
from tests.support import agent_clients as ac
from tests.support.recorder import Recorder

MAX_TOKENS = 8
ENVIRONMENT_MARKER = "gitStatus:"  # where Claude Code's environment block (git status) starts
# What each client says when the server's cap cuts its output (not a kvrouter failure): Claude
# Code asks to continue three times, then gives up with this; Codex exits 1 with the other.
CLAUDE_CUT_BY_LIMIT = re.compile(r"API Error: Claude's response exceeded the \d+ output token maximum")
CODEX_CUT_BY_LIMIT = "Incomplete response returned, reason: max_output_tokens"


@pytest.fixture(scope="module")
def served(start_server, tmp_path_factory):
    """(server, recorder, store directory) for the module."""
    kv = tmp_path_factory.mktemp("kv")
    server = start_server("--max-tokens-limit", str(MAX_TOKENS), "--kv-cache-dir", str(kv), name="agents")
    recorder = Recorder(server.url).start()
    yield server, recorder, kv
    recorder.stop()


def first_post(exchanges, path: str):
    posts = [e for e in exchanges if e.method == "POST" and e.path.startswith(path)]
    assert posts, f"the client sent no POST {path}"
    return posts[0]


def store_entries(kv) -> list[dict]:
    out = subprocess.run([*module_command("kvrouter.router.cli"), "cache", "ls", "--kv-cache-dir", str(kv), "--json"],
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def claude_prompt(tokenizer, body: dict):
    """The prompt kvrouter rendered for a recorded Claude Code request (billing line removed)."""
    system, _ = remove_billing_header(body.get("system"))
    req = parse_messages_request({**body, "system": system}, None)
    return tokenizer.chat_prompt(req.messages, req.tools)


@pytest.fixture(scope="module")
def claude_sessions(served, agent_clients, tmp_path_factory):
    """Runs Claude Code's four sessions; returns [(CompletedProcess, its exchanges)]."""
    server, recorder, _ = served
    root = tmp_path_factory.mktemp("claude")
    repo = ac.scratch_repo(root / "repo")
    home = root / "home"
    sessions = []

    def session(prompt: str) -> None:
        n = len(recorder.exchanges)
        done = ac.claude(agent_clients, recorder.url, repo, home, prompt)
        sessions.append((done, recorder.since(n)))

    session("Say hi")
    session("Name a colour")
    (repo / "NOTES.md").write_text("notes\n")
    ac.git(repo, "add", "NOTES.md")
    ac.git(repo, "commit", "-q", "-m", "add notes")
    session("Say hi")
    session("Count to three")
    return sessions


def test_claude_code_sessions_complete_without_api_error(claude_sessions):
    for i, (done, exchanges) in enumerate(claude_sessions, 1):
        output = done.stdout + done.stderr
        errors = [line for line in output.splitlines() if "API Error" in line and not CLAUDE_CUT_BY_LIMIT.search(line)]
        assert not errors, f"session {i}: {output[-2000:]}"
        assert done.returncode == 0 or CLAUDE_CUT_BY_LIMIT.search(output), f"session {i}: {output[-2000:]}"
        posts = [e for e in exchanges if e.path.startswith("/v1/messages")]
        assert posts and all(e.status == 200 for e in posts), [(e.path, e.status) for e in exchanges]
        for e in posts:  # every stream ended normally, with kvrouter's usage
            assert e.events[0]["type"] == "message_start" and e.events[-1]["type"] == "message_stop", e.events[-3:]
            assert e.cached_tokens() is not None


def test_claude_code_second_session_reuses_the_system_block(claude_sessions, served):
    server = served[0]
    tokenizer = ac.served_tokenizer(server.url)
    ex = first_post(claude_sessions[1][1], "/v1/messages")
    system_block = claude_prompt(tokenizer, ex.body).anchor_tokens
    assert system_block > 1000  # Claude Code's system prompt, as the default model's template renders it
    # a different first prompt changes the billing line's hex digits: removed, so reuse reaches past them
    assert ex.cached_tokens() >= system_block, (ex.cached_tokens(), system_block)
    assert "normalised=billing-header" in ex.response_headers["x-kvrouter-route"]


def test_claude_code_after_a_commit_reuses_up_to_the_environment_and_then_the_refreshed_anchor(
        claude_sessions, served):
    server, _, kv = served
    tokenizer = ac.served_tokenizer(server.url)
    before_commit = claude_prompt(tokenizer, first_post(claude_sessions[1][1], "/v1/messages").body)
    after = first_post(claude_sessions[2][1], "/v1/messages")
    prompt = claude_prompt(tokenizer, after.body)
    assert prompt.tokens[: prompt.anchor_tokens] != before_commit.tokens[: before_commit.anchor_tokens]
    environment = ac.tokens_before(tokenizer, prompt.text, ENVIRONMENT_MARKER)
    assert 0 < environment < prompt.anchor_tokens
    assert environment <= after.cached_tokens() < prompt.anchor_tokens, (environment, after.cached_tokens())
    # session 3 stored its refreshed anchor, and session 4 reuses at least that
    anchors = [e["n_tokens"] for e in store_entries(kv) if e["kind"] == "anchor"]
    assert prompt.anchor_tokens in anchors, anchors
    nxt = first_post(claude_sessions[3][1], "/v1/messages")
    assert nxt.cached_tokens() >= prompt.anchor_tokens, (nxt.cached_tokens(), prompt.anchor_tokens)


@pytest.fixture(scope="module")
def codex_sessions(served, agent_clients, tmp_path_factory):
    server, recorder, _ = served
    root = tmp_path_factory.mktemp("codex")
    repo = ac.scratch_repo(root / "repo")
    sessions = []
    for prompt in ("Say hi", "Name a colour"):
        n = len(recorder.exchanges)
        done = ac.codex(agent_clients, recorder.url, repo, root / "home", prompt)
        sessions.append((done, recorder.since(n)))
    return sessions


def test_codex_sessions_complete(codex_sessions):
    for i, (done, exchanges) in enumerate(codex_sessions, 1):
        errors = [line for line in (done.stdout + done.stderr).splitlines()
                  if "ERROR" in line and CODEX_CUT_BY_LIMIT not in line]
        assert not errors, f"session {i}: {errors}"
        posts = [e for e in exchanges if e.path.startswith("/v1/responses")]
        assert posts and all(e.status == 200 for e in posts)
        for e in posts:
            assert e.events[0]["type"] == "response.created"
            assert e.events[-1]["type"] in ("response.completed", "response.incomplete"), e.events[-1]


def test_codex_second_session_reuses_its_prefix(codex_sessions, served):
    tokenizer = ac.served_tokenizer(served[0].url)
    ex = first_post(codex_sessions[1][1], "/v1/responses")
    req = parse_responses_request(ex.body, 512, None)
    prompt = tokenizer.chat_prompt(req.messages, req.tools)
    assert prompt.anchor_tokens > 1000  # instructions, skills and the environment context
    assert ex.cached_tokens() >= prompt.anchor_tokens, (ex.cached_tokens(), prompt.anchor_tokens)
    assert ex.body.get("prompt_cache_key")  # Codex's session id: an affinity hint, counted
    with urllib.request.urlopen(served[0].url + "/metrics", timeout=10) as resp:
        assert 'hint="prompt_cache_key"' in resp.read().decode()
