"""Measures an agent client's session sequence against a fresh `kvrouter serve`
and prints the README's table: for the first request of each session, prompt
tokens, cached tokens, where they came from and the time to first token.

    python -m tests.support.agent_sessions claude [--model DIR] [--chat-template FILE]
        [--tools-before-system] [--json OUT]
    python -m tests.support.agent_sessions codex

Claude Code: four `claude -p` sessions in one scratch git repository (first
session; a different first prompt; a `git commit`, then a session; the session
after). Codex CLI: two `codex exec` sessions. The pinned clients come from npm
(tests/support/agent_clients.py); a recording proxy (tests/support/recorder.py)
times each request as the client sees it. Prompt and cached tokens are
kvrouter's usage; the source is the worker's (the router's `done ... source=`
log line of that request). The server caps output at `--max-tokens-limit`
(default 8 tokens here: Claude Code asks for 32,000).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from tests.support import agent_clients as ac
from tests.support.recorder import Recorder
from tests.support.server import KvrouterServer

DONE = re.compile(r"done worker=\S+ prompt=(\d+) cached=(\d+) source=(\w+) prefill_ms=(\d+)")

CLAUDE_STEPS = [("first session", "Say hi"), ("second session, another first prompt", "Name a colour"),
                ("after a git commit", "Say hi"), ("the session after", "Count to three")]
CODEX_STEPS = [("first session", "Say hi"), ("second session, another first prompt", "Name a colour")]


def done_lines(log: Path) -> list[tuple[int, int, str, int]]:
    """(prompt, cached, source, prefill ms) of every request the router finished, in order."""
    return [(int(a), int(b), c, int(d)) for a, b, c, d in DONE.findall(log.read_text(errors="replace"))]


def run(client: str, serve_args: list[str], root: Path) -> list[dict]:
    clients = ac.install()
    server = KvrouterServer(["--kv-cache-dir", str(root / "kv"), *serve_args], root / "serve.log").start()
    recorder = Recorder(server.url).start()
    model = ac.served_model(server.url)
    rows = []
    try:
        repo = ac.scratch_repo(root / "repo")
        steps = CLAUDE_STEPS if client == "claude" else CODEX_STEPS
        for label, prompt in steps:
            if label.startswith("after a git commit"):
                (repo / "NOTES.md").write_text("notes\n")
                ac.git(repo, "add", "NOTES.md")
                ac.git(repo, "commit", "-q", "-m", "add notes")
            n_ex, n_done = len(recorder.exchanges), len(done_lines(server.log_path))
            t0 = time.perf_counter()
            if client == "claude":
                done = ac.claude(clients, recorder.url, repo, root / "home", prompt, timeout_s=3600, model=model)
            else:
                done = ac.codex(clients, recorder.url, repo, root / "home", prompt, timeout_s=3600, model=model)
            wall = time.perf_counter() - t0
            posts = recorder.since(n_ex)
            finished = done_lines(server.log_path)[n_done:]
            if not posts or not finished:
                raise RuntimeError(f"session {label!r} reached no generation:\n{done.stdout[-2000:]}\n"
                                   f"{done.stderr[-2000:]}\n{server.log_tail()}")
            first = posts[0]
            prompt_tokens, cached, source, prefill_ms = finished[0]
            rows.append({"session": label, "prompt_tokens": prompt_tokens, "cached_tokens": cached,
                         "source": source if cached else "none", "prefill_ms": prefill_ms,
                         "ttft_s": round(first.ttft_s, 2) if first.ttft_s is not None else None,
                         "requests": len(posts), "session_s": round(wall, 1), "exit": done.returncode,
                         "route": first.response_headers.get("x-kvrouter-route", "")})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        recorder.stop()
        server.stop()
    return rows


def table(rows: list[dict]) -> str:
    out = ["| session | prompt tokens | cached tokens | from | time to first token |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['session']} | {r['prompt_tokens']:,} | {r['cached_tokens']:,} | {r['source']} | "
                   f"{r['ttft_s']} s |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.agent_sessions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("client", choices=["claude", "codex"])
    p.add_argument("--model", help="kvrouter serve --model (default: the default model)")
    p.add_argument("--chat-template", help="kvrouter serve --chat-template FILE")
    p.add_argument("--tools-before-system", action="store_true")
    p.add_argument("--max-tokens-limit", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the rows here")
    ns = p.parse_args(argv)
    args = ["--max-tokens-limit", str(ns.max_tokens_limit)]
    if ns.model:
        args += ["--model", ns.model]
    if ns.chat_template:
        args += ["--chat-template", ns.chat_template]
    if ns.tools_before_system:
        args.append("--tools-before-system")
    with tempfile.TemporaryDirectory(prefix="agent-sessions-") as tmp:
        rows = run(ns.client, args, Path(tmp))
    print(table(rows))
    if ns.json:
        ns.json.write_text(json.dumps({"serve_args": args, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
