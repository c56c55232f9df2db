"""A recording HTTP proxy between an agent client (Claude Code, Codex CLI) and a
real `kvrouter serve`: every request is forwarded unchanged and kept, with the
response (status, headers, the SSE events), so tests can read what the client
really sent and what kvrouter answered. It changes nothing; it runs an aiohttp
server on a thread of its own, on a free loopback port.

Also a tool: `python -m tests.support.recorder UPSTREAM_URL OUT_DIR [PORT]` records
a session into OUT_DIR (one JSON file per request), as the files in
`tests/support/captures/` were captured.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

HOP_HEADERS = {"host", "content-length", "accept-encoding", "connection", "transfer-encoding"}
# SSE data that carries generated text (an empty text delta, a keep-alive, does not)
TOKEN_DATA = re.compile(rb'"text_delta", "text": "[^"]|"input_json_delta"|"type": "response\.output_text\.delta"'
                        rb'|"type": "response\.function_call_arguments\.delta"')


@dataclass
class Exchange:
    """One request and its response. events: the SSE events (decoded `data:` JSON) of
    a stream; body_text: the response body of anything else."""

    method: str
    path: str
    headers: dict
    body: object
    status: int = 0
    response_headers: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    body_text: str = ""
    started_s: float = 0.0  # time.perf_counter() when the request arrived
    first_event_s: float | None = None  # ... when the first SSE event came back
    first_token_s: float | None = None  # ... when the first generated text came back

    @property
    def ttft_s(self) -> float | None:
        """Seconds from the request to its first generated text, as the client saw them."""
        return None if self.first_token_s is None else self.first_token_s - self.started_s

    def usage(self) -> dict | None:
        """The final usage of an Anthropic or OpenAI Responses stream, or of a plain body."""
        for ev in reversed(self.events):
            if ev.get("type") == "message_delta":
                return ev.get("usage")
            if ev.get("type") in ("response.completed", "response.incomplete"):
                return ev["response"].get("usage")
        try:
            return json.loads(self.body_text).get("usage")
        except (ValueError, AttributeError):
            return None

    def cached_tokens(self) -> int | None:
        """Prompt tokens kvrouter reported reused (Anthropic cache_read_input_tokens,
        Responses input_tokens_details.cached_tokens)."""
        u = self.usage()
        if u is None:
            return None
        if "cache_read_input_tokens" in u:
            return u["cache_read_input_tokens"]
        return (u.get("input_tokens_details") or {}).get("cached_tokens")

    def prompt_tokens(self) -> int | None:
        u = self.usage()
        if u is None:
            return None
        if "cache_read_input_tokens" in u:
            return u["input_tokens"] + max(u["cache_read_input_tokens"], u["cache_creation_input_tokens"])
        return u.get("input_tokens")

    def to_json(self) -> dict:
        return {"method": self.method, "path": self.path, "headers": self.headers, "body": self.body,
                "status": self.status, "response_headers": self.response_headers, "events": self.events,
                "body_text": self.body_text}


def parse_sse(text: str) -> list[dict]:
    """The JSON `data:` payloads of an SSE body ([DONE] and comments left out)."""
    out = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                try:
                    out.append(json.loads(line[6:]))
                except ValueError:
                    pass
    return out


class Recorder:
    """`Recorder(upstream_url).start()`; clients use `.url`; `.exchanges` grows as they talk.
    `out_dir`: also write each exchange there as NNN.json."""

    def __init__(self, upstream: str, out_dir: Path | None = None):
        self.upstream = upstream.rstrip("/")
        self.out_dir = out_dir
        self.exchanges: list[Exchange] = []
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self, port: int = 0) -> "Recorder":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve(port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="recorder", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the recording proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = None

    def since(self, n: int) -> list[Exchange]:
        """The POST exchanges recorded after the first `n` exchanges."""
        return [e for e in self.exchanges[n:] if e.method == "POST"]

    async def _serve(self, port: int) -> None:
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        ex = Exchange(request.method, request.path_qs, dict(request.headers), body, started_s=time.perf_counter())
        self.exchanges.append(ex)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.request(request.method, self.upstream + request.path_qs, data=raw,
                                       headers=headers) as up:
                ex.status, ex.response_headers = up.status, dict(up.headers)
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS | {"content-encoding"}})
                await resp.prepare(request)
                chunks = []
                async for chunk in up.content.iter_any():
                    if ex.first_event_s is None and b"data:" in chunk:
                        ex.first_event_s = time.perf_counter()
                    if ex.first_token_s is None and TOKEN_DATA.search(chunk):
                        ex.first_token_s = time.perf_counter()
                    chunks.append(chunk)
                    await resp.write(chunk)
                text = b"".join(chunks).decode(errors="replace")
                if up.headers.get("content-type", "").startswith("text/event-stream"):
                    ex.events = parse_sse(text)
                else:
                    ex.body_text = text
                try:
                    await resp.write_eof()
                except ConnectionResetError:
                    pass  # the client closed first (Codex does once it has response.completed)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"{len(self.exchanges):03d}.json").write_text(json.dumps(ex.to_json(), indent=1))
        return resp


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    rec = Recorder(argv[0], Path(argv[1])).start(int(argv[2]) if len(argv) > 2 else 0)
    print(f"recording on {rec.url} -> {argv[0]}; Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        rec.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
