"""Tool calls: parsing them out of generated text with mlx-lm's own tool parsers
(`mlx_lm.tool_parsers.<name>`).

Which parser fits a model's chat template is mlx-lm's choice, made by the worker
(`worker.models.tool_parser`) and reported in `ModelInfo.tool_parser`. The router
loads that parser module from mlx-lm's files but must not import MLX:
`import mlx_lm.tool_parsers.<name>` would run `mlx_lm/__init__.py`, which imports
mlx (2 s and the MLX runtime in the router process). The parser modules themselves
are plain Python (json, regex, ast), so `_parsers_package()` registers mlx-lm's
`tool_parsers` directory as a package of its own name, through importlib's
`spec_from_file_location` (relative imports between parsers keep working), and
imports the parser from it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger("kvrouter.router.tools")

PARSERS_PACKAGE = "_kvrouter_mlx_lm_tool_parsers"
"""The name mlx-lm's `tool_parsers` directory is imported under in the router."""


def _parsers_package() -> ModuleType:
    """mlx-lm's `tool_parsers` package, imported from its directory without `mlx_lm`'s
    own `__init__` (which imports MLX). Raises ImportError without mlx-lm."""
    if PARSERS_PACKAGE in sys.modules:
        return sys.modules[PARSERS_PACKAGE]
    mlx_lm = importlib.util.find_spec("mlx_lm")  # finds the package without importing it
    if mlx_lm is None or not mlx_lm.submodule_search_locations:
        raise ImportError("mlx-lm is not installed")
    directory = Path(next(iter(mlx_lm.submodule_search_locations))) / "tool_parsers"
    spec = importlib.util.spec_from_file_location(PARSERS_PACKAGE, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PARSERS_PACKAGE] = package
    spec.loader.exec_module(package)
    return package


@dataclass(frozen=True)
class ToolSyntax:
    """How a template marks tool calls: start/end markers and mlx-lm's parse function."""

    name: str
    start: str
    end: str
    parse: object  # parse_tool_call(text, tools) -> dict | list[dict]


@lru_cache(maxsize=16)
def tool_syntax(parser: str) -> ToolSyntax | None:
    """The markers and parse function of mlx-lm's tool parser `parser` (a name from
    `ModelInfo.tool_parser`), or None for "" or a parser this mlx-lm lacks."""
    if not parser:
        return None
    try:
        _parsers_package()
        mod = importlib.import_module(f"{PARSERS_PACKAGE}.{parser}")
    except Exception as exc:  # noqa: BLE001 - a worker's mlx-lm newer than ours: no parsing, with a warning
        log.warning("tool parser %s unavailable: %s", parser, exc)
        return None
    return ToolSyntax(parser, mod.tool_call_start, mod.tool_call_end, mod.parse_tool_call)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


def new_call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


def parse_calls(syntax: ToolSyntax, segments: list[str], tools: list | None) -> tuple[list[ToolCall], str]:
    """Parses tool-call segments (the text between the markers). Returns the
    calls and the text of segments that did not parse (kept as content)."""
    calls: list[ToolCall] = []
    unparsed: list[str] = []
    for seg in segments:
        try:
            parsed = syntax.parse(seg, tools)
        except Exception as exc:  # noqa: BLE001 - model output: any parse failure means "not a call"
            log.info("tool call did not parse (%s: %s)", type(exc).__name__, exc)
            unparsed.append(syntax.start + seg)
            continue
        for p in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                unparsed.append(syntax.start + seg)
                continue
            args = p.get("arguments", {})
            calls.append(ToolCall(p.get("id") or new_call_id(), p["name"],
                                  args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return calls, "".join(unparsed)


class ToolCallSplitter:
    """Separates streamed text into content and tool-call text.

    `feed(text)` returns content safe to emit now; text that could be the start
    of the start marker is held back, and everything from the first start marker
    on is buffered. `finish()` returns (remaining content, tool calls).
    """

    def __init__(self, syntax: ToolSyntax | None, tools: list | None):
        self.syntax = syntax
        self.tools = tools
        self._pending = ""
        self._calls_text: str | None = None

    def feed(self, text: str) -> str:
        if self.syntax is None:
            return text
        if self._calls_text is not None:
            self._calls_text += text
            return ""
        buf = self._pending + text
        i = buf.find(self.syntax.start)
        if i >= 0:
            self._pending = ""
            self._calls_text = buf[i:]
            return buf[:i]
        start = self.syntax.start
        hold = next((k for k in range(min(len(start) - 1, len(buf)), 0, -1) if buf.endswith(start[:k])), 0)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self._pending = self._pending, ""
        if self._calls_text is None or self.syntax is None:
            return rest, []
        s, e = self.syntax.start, self.syntax.end
        segments, tail = [], []
        for piece in self._calls_text.split(s)[1:]:
            body, sep, after = piece.partition(e) if e else (piece, "", "")
            segments.append(body)
            if after.strip():
                tail.append(after)
        calls, unparsed = parse_calls(self.syntax, segments, self.tools)
        return rest + unparsed + "".join(tail), calls


def split_text(syntax: ToolSyntax | None, tools: list | None, text: str) -> tuple[str, list[ToolCall]]:
    """(content, tool calls) of a whole generated text."""
    splitter = ToolCallSplitter(syntax, tools)
    head = splitter.feed(text)
    rest, calls = splitter.finish()
    return head + rest, calls
