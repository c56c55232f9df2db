"""Tool calls: which syntax a chat template uses, and parsing them out of
generated text with mlx-lm's own tool parsers (`mlx_lm.tool_parsers`).

The parsers are plain-Python modules; they are loaded from mlx-lm's package
directory under a private package name so that the router never imports
`mlx_lm` itself (whose `__init__` imports MLX).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import types
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("kvrouter.router.tools")

_PKG = "_kvrouter_mlx_tool_parsers"

# The chat-template markers mlx-lm uses to pick a parser (mlx_lm.tokenizer_utils._infer_tool_parser), in its order.
_TEMPLATE_MARKERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<minimax:tool_call>",), "minimax_m2"),
    (("<|tool_call>", "<tool_call|>"), "gemma4"),
    (("<start_function_call>",), "function_gemma"),
    (("<longcat_tool_call>",), "longcat"),
    (("<arg_key>",), "glm47"),
    (("<|tool_list_start|>",), "pythonic"),
    (("<|tool_call_start|>",), "pythonic"),
    (("<tool_call>\\n<function=",), "qwen3_coder"),
    (("<tool_call>\n<function=",), "qwen3_coder"),
    (("<|tool_calls_section_begin|>",), "kimi_k2"),
    (('<function name="', '<param name="'), "minicpm5"),
    (("[TOOL_CALLS]",), "mistral"),
    (("<atem:function_calls>",), "muse_spark"),
    (("<tool_call>", "tool_call.name"), "json_tools"),
)


def infer_parser_name(chat_template: str | None, vocab: dict | None = None) -> str | None:
    """The mlx-lm tool parser for a chat template (or its vocabulary), else None."""
    if isinstance(chat_template, str):
        for markers, name in _TEMPLATE_MARKERS:
            if all(m in chat_template for m in markers):
                return name
    if vocab and "<|tool_call_start|>" in vocab and "<|tool_call_end|>" in vocab:
        return "pythonic"
    return None


def _load_parser_module(name: str):
    if _PKG not in sys.modules:
        spec = importlib.util.find_spec("mlx_lm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mlx_lm is not installed")
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [str(Path(list(spec.submodule_search_locations)[0]) / "tool_parsers")]
        sys.modules[_PKG] = pkg
    return importlib.import_module(f"{_PKG}.{name}")


@dataclass(frozen=True)
class ToolSyntax:
    """How a template marks tool calls: start/end markers and mlx-lm's parse function."""

    name: str
    start: str
    end: str
    parse: object  # parse_tool_call(text, tools) -> dict | list[dict]


@lru_cache(maxsize=16)
def tool_syntax(chat_template: str | None, vocab_has_pythonic: bool = False) -> ToolSyntax | None:
    name = infer_parser_name(chat_template, {"<|tool_call_start|>": 0, "<|tool_call_end|>": 0}
                             if vocab_has_pythonic else None)
    if name is None:
        return None
    try:
        mod = _load_parser_module(name)
    except Exception as exc:  # an mlx-lm without this parser
        log.warning("tool parser %s unavailable: %s", name, exc)
        return None
    return ToolSyntax(name, mod.tool_call_start, mod.tool_call_end, mod.parse_tool_call)


def syntax_for(tokenizer) -> ToolSyntax | None:
    """The tool syntax of a router.prompting.ModelTokenizer's template."""
    vocab = tokenizer.vocab()
    return tool_syntax(tokenizer.chat_template, "<|tool_call_start|>" in vocab and "<|tool_call_end|>" in vocab)


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
