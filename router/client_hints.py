"""What agent clients tell the router beyond the conversation, and the client
metadata that must not reach the prompt.

* **Checkpoint hints.** Anthropic clients mark the ends of their stable prefixes
  with `cache_control` breakpoints (Claude Code: its system blocks and the last
  user message). `anthropic_marks` lists the text-bearing blocks of a request in
  order with their breakpoints; `mark_ends` finds where each marked block ends in
  the rendered prompt text (characters), and `router.token_positions` turns those
  into prompt token positions, which the worker treats as candidate checkpoint
  positions (kind `hint`, bounded by `cachestore.plan_stores`).
* **Affinity hints.** OpenAI's `prompt_cache_key` (Codex CLI sends its session
  id) names a conversation; `router.affinity` routes it back to the worker that
  served it last. It is never a namespace: it cannot reach another tenant's cache.
* **Volatile client metadata.** Claude Code starts its system prompt with a line
  `x-anthropic-billing-header: cc_version=2.1.197.<3 hex>; ...` whose hex digits
  follow the first user prompt, so two sessions would diverge at its ~24th token
  and never share their stored prefix. `remove_billing_header` drops that line,
  and only that line: a line at the start of a system text block (or of the
  system string) beginning with exactly `BILLING_HEADER_PREFIX`.

Nothing here does I/O or knows the model; prompting.py renders and tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass

BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"
"""Claude Code's billing line (metadata for Anthropic's API, not an instruction to the model)."""


def remove_billing_header(system):
    """Anthropic `system` (a string, a list of content blocks, or None) without
    Claude Code's billing line. Returns (system, removed: bool); the input is not
    modified. Only a line that begins a system text block (or the system string)
    with exactly `BILLING_HEADER_PREFIX` is removed, up to and including its
    newline; a block left empty is dropped. Anything else passes unchanged."""
    if isinstance(system, str):
        rest = _without_first_line(system)
        return (system, False) if rest is None else (rest, True)
    if not isinstance(system, list):
        return system, False
    out, removed = [], False
    for block in system:
        text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
        rest = _without_first_line(text) if isinstance(text, str) else None
        if rest is None:
            out.append(block)
            continue
        removed = True
        if rest:
            out.append({**block, "text": rest})
    return out, removed


def _without_first_line(text: str) -> str | None:
    """`text` without its first line when that line is the billing header, else None."""
    if not text.startswith(BILLING_HEADER_PREFIX):
        return None
    newline = text.find("\n")
    return "" if newline < 0 else text[newline + 1:]


@dataclass(frozen=True)
class PromptMarks:
    """The text-bearing blocks of an Anthropic request, in request order, and where
    the client put `cache_control` breakpoints.

    texts: (text, marked) for every system block, message text block and
        tool_result text, in the order the request gives them; `marked`: the block
        carries `cache_control` (its end is a candidate checkpoint position).
    tool_names: names of the tools that carry `cache_control` (the end of that
        tool's definition is a candidate position).
    unplaceable: breakpoints on blocks whose rendering is not their text
        (tool_use, images): counted, never placed.
    """

    texts: tuple[tuple[str, bool], ...] = ()
    tool_names: tuple[str, ...] = ()
    unplaceable: int = 0

    @property
    def count(self) -> int:
        """Breakpoints in the request."""
        return sum(1 for _, marked in self.texts if marked) + len(self.tool_names) + self.unplaceable

    def __bool__(self) -> bool:
        return self.count > 0


def _has_breakpoint(block) -> bool:
    return isinstance(block, dict) and isinstance(block.get("cache_control"), dict)


def anthropic_marks(system, messages, tools) -> PromptMarks:
    """The PromptMarks of an Anthropic Messages request from its raw `system`
    (after `remove_billing_header`), `messages` and `tools` fields. Malformed parts
    are skipped (the request parser reports them)."""
    texts: list[tuple[str, bool]] = []
    unplaceable = 0

    def add_blocks(content) -> None:
        nonlocal unplaceable
        if isinstance(content, str):
            texts.append((content, False))
            return
        if not isinstance(content, list):
            return
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append((block["text"], _has_breakpoint(block)))
            elif kind == "tool_result":
                inner = block.get("content")
                if isinstance(inner, str):
                    texts.append((inner, _has_breakpoint(block)))
                elif isinstance(inner, list):
                    parts = [b["text"] for b in inner if isinstance(b, dict) and isinstance(b.get("text"), str)]
                    texts.append(("".join(parts), _has_breakpoint(block) or any(map(_has_breakpoint, inner))))
                else:
                    unplaceable += _has_breakpoint(block)
            else:
                unplaceable += _has_breakpoint(block)

    add_blocks(system)
    for m in messages if isinstance(messages, list) else ():
        if isinstance(m, dict):
            add_blocks(m.get("content"))
    names = tuple(t["name"] for t in tools if _has_breakpoint(t) and isinstance(t.get("name"), str)) \
        if isinstance(tools, list) else ()
    return PromptMarks(tuple(texts), names, unplaceable)


def mark_ends(text: str, marks: PromptMarks) -> tuple[list[int], int]:
    """Where the marked blocks of `marks` end in the rendered prompt `text`, in
    characters. Blocks are looked for in order from where the previous one ended
    (a template renders them in request order); a block a template changed (e.g.
    trimmed) is looked for trimmed. Returns (sorted character offsets, marked
    blocks not found)."""
    ends: list[int] = []
    missing = 0
    cursor = 0
    for block, marked in marks.texts:
        found = -1
        for candidate in (block, block.strip()):
            if candidate:
                found = text.find(candidate, cursor)
                if found >= 0:
                    block = candidate
                    break
        if found < 0:
            missing += marked
            continue
        cursor = found + len(block)
        if marked:
            ends.append(cursor)
    return sorted(set(ends)), missing


def prompt_cache_key(body) -> str:
    """OpenAI's `prompt_cache_key` (a string the client uses to group requests that
    share a prefix; Codex CLI sends its session id), or "" when absent or not a string."""
    key = body.get("prompt_cache_key") if isinstance(body, dict) else None
    return key if isinstance(key, str) else ""
