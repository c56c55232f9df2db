"""`kvrouter serve` started from a directory whose own files share names with
kvrouter's packages and its dependencies (`router/`, `worker/`, `kvrouter/`,
`h2.py`): the router and its workers import only the installed code, because
every process kvrouter starts runs as `python -P -m ...` and the console script
never puts the launch directory on `sys.path`."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.server import KvrouterServer, openai_client

MODEL = "SmolLM2-135M-Instruct"
TRAP = "raise ImportError('imported from the launch directory: {name}')\n"


def make_trap_directory(root: Path) -> Path:
    root.mkdir()
    for package in ("router", "worker", "cachestore", "kvrouter"):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text(TRAP.format(name=package))
    for module in ("h2", "grpc", "mlx", "lmdb"):
        (root / f"{module}.py").write_text(TRAP.format(name=module))
    return root


def test_serve_from_a_directory_with_packages_of_the_same_names(tmp_path):
    launch = make_trap_directory(tmp_path / "project")
    console_script = Path(sys.executable).with_name("kvrouter")
    server = KvrouterServer(["--no-kv-cache", "--max-tokens-limit", "8"], tmp_path / "serve.log",
                            cwd=launch, command=[str(console_script)])
    try:
        server.start()
        r = openai_client(server).chat.completions.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Say hi."}])
        assert r.choices[0].message.content
        assert r.usage.completion_tokens > 0
        assert "imported from the launch directory" not in server.log_tail(200)
    finally:
        assert server.stop() == 0, server.log_tail()
