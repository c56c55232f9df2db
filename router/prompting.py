"""Turning chat messages into prompt token ids, and finding the cold-anchor length.

The chat template and tokenizer come from the worker (`GetModelInfo`), so the
router holds no model code and tokenizes exactly as the worker's model expects.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrouter.router.errors import BadRequest
from kvrouter.router.incremental import IncrementalEncoder
from kvrouter.worker.models.tokenizer import build_hf_tokenizer


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt. tokens: token ids; anchor_tokens: length of the stable
    chat prefix when it is an exact token prefix of `tokens`, else 0."""

    text: str
    tokens: tuple[int, ...]
    anchor_tokens: int


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
        self._vocab: dict[str, int] | None = None

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

    def chat_prompt(self, messages: list[dict], tools: list | None = None) -> Prompt:
        """Renders `messages` with the generation prompt and finds the anchor.

        The anchor counts only when its own rendering tokenizes to an exact prefix
        of the full prompt's tokens (case C7: never store a prefix the prompt does
        not really start with).
        """
        text = self._render(messages, tools, True)
        tokens = self.encode(text)
        anchor = 0
        k = anchor_message_count(messages)
        if k > 0:
            prefix = self.encode(self._render(messages[:k], tools, False))
            if 0 < len(prefix) < len(tokens) and tokens[: len(prefix)] == prefix:
                anchor = len(prefix)
        return Prompt(text, tokens, anchor)
