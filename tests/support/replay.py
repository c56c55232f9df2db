"""The replay helper: send a scripted sequence of chat requests and record, per
request, the tokens prefilled and the tokens reused (from `usage`), so cache
policy outcomes are asserted in tokens, never in seconds."""

from __future__ import annotations

from dataclasses import dataclass

import openai


@dataclass(frozen=True)
class Step:
    """One scripted request."""

    label: str
    messages: list[dict]
    max_tokens: int = 4


@dataclass(frozen=True)
class Record:
    label: str
    prompt_tokens: int
    cached_tokens: int
    text: str

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def replay(client: openai.OpenAI, model: str, steps: list[Step]) -> dict[str, Record]:
    """Sends `steps` in order at temperature 0; returns the records by label."""
    out = {}
    for step in steps:
        resp = client.chat.completions.create(
            model=model, messages=step.messages, temperature=0, max_tokens=step.max_tokens
        )
        out[step.label] = Record(
            step.label,
            resp.usage.prompt_tokens,
            resp.usage.prompt_tokens_details.cached_tokens,
            resp.choices[0].message.content,
        )
    return out
