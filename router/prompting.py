"""Turning chat messages into prompt token ids, and finding the cold-anchor length
and the client's checkpoint hints on those tokens.

The chat template and tokenizer come from the worker (`GetModelInfo`), so the
router holds no model code and tokenizes exactly as the worker's model expects.

Two choices depend on what the template can render, found once per template by
rendering probe conversations (`TemplateTraits`):
- a system message after the first message (Claude Code sends one after the
  user turn) is rendered as a system turn where the template renders it there;
  otherwise it is folded into the user turn before it as
  `<system-reminder>...</system-reminder>` (what Claude Code's own fallback does);
- `tools_first`: with a leading empty system message the template renders the
  tool definitions before the system text (ChatML / Qwen-style templates list
  tools inside the first system turn, after its text). Opt-in
  (`--tools-before-system`): volatile system text (Claude Code's git status) then
  no longer invalidates the tools' KV state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from kvrouter.router.client_hints import PromptMarks, mark_ends
from kvrouter.router.errors import BadRequest
from kvrouter.router.incremental import IncrementalEncoder
from kvrouter.router.token_positions import TokenPositions
from kvrouter.worker.models.tokenizer import build_hf_tokenizer

SYSTEM_REMINDER = "<system-reminder>\n{}\n</system-reminder>"
"""How a system message is folded into a user turn (Claude Code's own wrapper)."""

_PROBE_TOOL = {"type": "function", "function": {
    "name": "kvrouter_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}}}


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt. tokens: token ids; anchor_tokens: length of the stable
    chat prefix when it is an exact token prefix of `tokens`, else 0.

    hint_tokens: positions (tokens, sorted, each in (0, len(tokens))) where the
    client's cache_control breakpoints end; hints_unplaced: breakpoints that could
    not be placed on tokens; systems_folded: system messages folded into a user
    turn; tools_first: the tools were rendered before the system text.
    """

    text: str
    tokens: tuple[int, ...]
    anchor_tokens: int
    hint_tokens: tuple[int, ...] = ()
    hints_unplaced: int = 0
    systems_folded: int = 0
    tools_first: bool = False


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template renders, found by rendering probe conversations.

    system_midway: a system message after the first message becomes a turn of its own.
    tools_first: a leading empty system message makes the tools render before the
        system text of the next system message (and without it they render after).
    """

    system_midway: bool
    tools_first: bool


def fold_system_messages(messages: list[dict]) -> tuple[list[dict], int]:
    """`messages` with every system message after the first message folded into a
    user turn as SYSTEM_REMINDER: appended to the user turn before it, else
    prepended to the user turn after it, else made a user turn of its own.
    Returns (messages, how many were folded); the input is not modified."""
    out: list[dict] = []
    folded = 0
    carry: list[str] = []  # reminders waiting for the next user turn
    for i, m in enumerate(messages):
        if m.get("role") != "system" or i == 0:
            if m.get("role") == "user" and carry:
                m = {**m, "content": _join(*carry, m.get("content") or "")}
                carry = []
            out.append(m)
            continue
        folded += 1
        reminder = SYSTEM_REMINDER.format(m.get("content") or "")
        if out and out[-1].get("role") == "user":
            out[-1] = {**out[-1], "content": _join(out[-1].get("content") or "", reminder)}
        else:
            carry.append(reminder)
    if carry:
        out.append({"role": "user", "content": _join(*carry)})
    return out, folded


def _join(*parts: str) -> str:
    """Non-empty `parts` joined so that a blank line separates each from the next."""
    out = ""
    for part in (p for p in parts if p):
        out += ("" if not out or out.endswith("\n\n") else "\n" if out.endswith("\n") else "\n\n") + part
    return out


def anchor_message_count(messages: list[dict]) -> int:
    """How many leading messages form the stable chat prefix.

    The cold anchor is everything before the last user turn that precedes the
    first assistant turn (ds4's rule: long system and tool blocks live there).
    Returns 0 when there is no such user turn.
    """
    first_assistant = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    users = [i for i in range(first_assistant) if messages[i].get("role") == "user"]
    return users[-1] if users else 0


class ModelTokenizer:
    """Renders and tokenizes prompts for one model.

    Built from the worker's `router.worker_client.ModelInfo`: tokenizer_json (a
    `tokenizers` JSON), chat_template (the router's --chat-template when it replaces
    the model's own), eos/bos ids and the context length in tokens.
    """

    def __init__(self, info):
        self.context_length = info.context_length
        self.chat_template = info.chat_template
        self._tok = build_hf_tokenizer(
            info.tokenizer_json,
            self.chat_template or None,
            tuple(info.eos_token_ids),
            info.bos_token_id,
        )
        self.has_chat_template = bool(self.chat_template)
        self.incremental = IncrementalEncoder(self._tok.backend_tokenizer)
        self.positions = TokenPositions(self._tok.backend_tokenizer)
        self._vocab: dict[str, int] | None = None

    @functools.cached_property
    def traits(self) -> TemplateTraits:
        """What this tokenizer's chat template renders (probed once)."""
        def render(messages, tools=None) -> str:
            try:
                return self._render(messages, tools, True)
            except BadRequest:
                return ""

        mid = render([{"role": "system", "content": "kvr-probe-s1"}, {"role": "user", "content": "kvr-probe-u"},
                      {"role": "system", "content": "kvr-probe-s2"}])
        system_midway = "kvr-probe-u" in mid and mid.find("kvr-probe-s2") > mid.find("kvr-probe-u")
        name = _PROBE_TOOL["function"]["name"]
        plain = render([{"role": "system", "content": "kvr-probe-s"}, {"role": "user", "content": "kvr-probe-u"}],
                       [_PROBE_TOOL])
        first = render([{"role": "system", "content": ""}, {"role": "system", "content": "kvr-probe-s"},
                        {"role": "user", "content": "kvr-probe-u"}], [_PROBE_TOOL])
        tools_first = (system_midway and plain.find(name) > plain.find("kvr-probe-s") >= 0
                       and 0 <= first.find(name) < first.find("kvr-probe-s") < first.find("kvr-probe-u"))
        return TemplateTraits(system_midway, tools_first)

    def vocab(self) -> dict[str, int]:
        """Token string -> id (built once: tens of thousands of entries, read per request)."""
        if self._vocab is None:
            self._vocab = self._tok.get_vocab()
        return self._vocab

    def _render(self, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
        if not self.has_chat_template:
            raise BadRequest("this model has no chat template; use /v1/completions")
        try:
            return self._tok.apply_chat_template(
                messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
            )
        except Exception as exc:  # jinja errors raised by the template itself
            raise BadRequest(f"cannot render the chat template for these messages: {exc}") from exc

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of `text`, special tokens in the text recognised, none added; the part
        an earlier prompt shared is not tokenized again (`router.incremental`)."""
        return self.incremental.encode(text)

    def decode(self, tokens) -> str:
        return self._tok.decode(list(tokens))

    def chat_prompt(self, messages: list[dict], tools: list | None = None, marks: PromptMarks | None = None,
                    tools_first: bool = False) -> Prompt:
        """Renders `messages` with the generation prompt and finds the anchor and hints.

        System messages after the first are folded into user turns when the template
        does not render them (`fold_system_messages`). `tools_first`: render the tools
        before the system text where the template can (`TemplateTraits.tools_first`).
        `marks`: the client's cache_control breakpoints, placed on tokens as
        `Prompt.hint_tokens`. The anchor counts only when its own rendering tokenizes
        to an exact prefix of the full prompt's tokens (case C7: never store a prefix
        the prompt does not really start with). Raises BadRequest when the template
        cannot render the messages.
        """
        folded = 0
        if any(m.get("role") == "system" for m in messages[1:]) and not self.traits.system_midway:
            messages, folded = fold_system_messages(messages)
        first = bool(tools_first and tools and messages and messages[0].get("role") == "system"
                     and self.traits.tools_first)
        if first:
            messages = [{"role": "system", "content": ""}, *messages]
        text = self._render(messages, tools, True)
        hints, unplaced = (), 0
        tokens = self.encode(text)
        if marks:
            ends, unplaced = mark_ends(text, marks)
            tool_ends = [self._tool_end(messages, tools, text, name) for name in marks.tool_names]
            unplaced += marks.unplaceable + sum(1 for e in tool_ends if e is None)
            hints = self.positions.positions(text, tokens, ends + [e for e in tool_ends if e is not None])
        anchor = 0
        k = anchor_message_count(messages)
        if k > 0:
            prefix = self.encode(self._render(messages[:k], tools, False))
            if 0 < len(prefix) < len(tokens) and tokens[: len(prefix)] == prefix:
                anchor = len(prefix)
        return Prompt(text, tokens, anchor, hints, unplaced, folded, first)

    def _tool_end(self, messages: list[dict], tools: list | None, text: str, name: str) -> int | None:
        """Where the definition of tool `name` ends in the prompt `text` (characters):
        the rendering with the tools up to it and with one more tool agree up to there.
        None when the template renders no tools or the tool is not rendered."""
        names = [t.get("function", {}).get("name") for t in tools or ()]
        if name not in names:
            return None
        upto = list(tools[: names.index(name) + 1])
        try:
            a = self._render(messages, upto, True)
            b = self._render(messages, [*upto, _PROBE_TOOL], True)
        except BadRequest:
            return None
        if a == b:
            return None
        end = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return end if text[:end] == a[:end] else None
