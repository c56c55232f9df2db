"""Running one job for any protocol view: stop strings, early close, usage.

The worker engine has no stop strings, so they live here: `StopMatcher` scans
the streamed text, holds back text that could be the start of a stop string,
and ends the stream at the first match. `generate()` then closes the
dispatcher's iterator, which cancels the generation on the worker (the same
path a client disconnect takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, AsyncIterator

from pydantic import Field, PlainValidator

from kvrouter.router.errors import BadRequest
from kvrouter.router.views.validation import text_error
from kvrouter.router.worker_client import Completion, Delta

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


def stop_strings(value) -> tuple[str, ...]:
    """Stop strings from a request field: null, a string, or a list of at most
    MAX_STOP_SEQUENCES strings of at most MAX_STOP_CHARS characters each; empty
    strings are dropped. Raises ValueError whose text names the field "{param}"."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("'{param}' must be a string or an array of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise ValueError(f"'{{param}}' takes at most {MAX_STOP_SEQUENCES} strings")
    if any(len(s) > MAX_STOP_CHARS for s in value):
        raise ValueError(f"each '{{param}}' string must be at most {MAX_STOP_CHARS} characters")
    return tuple(s for s in value if s)


def parse_stop(value, param: str) -> tuple[str, ...]:
    """`stop_strings(value)`; raises BadRequest naming `param`."""
    try:
        return stop_strings(value)
    except ValueError as exc:
        raise BadRequest(str(exc).replace("{param}", param), param=param) from exc


def _validate_stop(value) -> tuple[str, ...]:
    try:
        return stop_strings(value)
    except ValueError as exc:
        raise text_error(str(exc)) from exc


StopStrings = Annotated[tuple[str, ...], PlainValidator(
    _validate_stop,
    json_schema_input_type=Annotated[str, Field(max_length=MAX_STOP_CHARS)]
    | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_SEQUENCES)]
    | None)]
"""A body field of stop strings (`stop`, `stop_sequences`): validated by `stop_strings`."""


class StopMatcher:
    """Finds the first occurrence of any stop string in streamed text.

    `feed(text)` returns (text safe to emit now, the stop string matched or None).
    Text that ends with a proper prefix of a stop string is held back until the
    next feed shows whether the stop string follows; `flush()` returns it at the end.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        if not self.stops:
            return text, None
        buf = self._pending + text
        first = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self._pending = ""
            return buf[: first[0]], first[1]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


@dataclass(frozen=True)
class Outcome:
    """How a generation ended, with usage in tokens.

    finish_reason: "stop" (end of turn or stop string), "length" (max_tokens),
        or "cancelled". stop_sequence: the stop string that ended it, if any.
    cached_tokens: prompt tokens reused from the cache, as the worker reported
        them (with its first token, so also when a stop string ends the generation
        before the worker's final report).
    stored_tokens: tokens of the longest checkpoint written for this request.
    """

    finish_reason: str
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    stored_tokens: int

    @classmethod
    def from_completion(cls, c: Completion) -> "Outcome":
        reason = "length" if c.finish_reason == "length" else "stop"
        return cls(reason, None, c.prompt_tokens, c.completion_tokens, c.cached_tokens, c.stored_tokens)


async def generate(dispatcher, job, route, stops: tuple[str, ...] = ()) -> AsyncIterator[str | Outcome]:
    """Yields text pieces, then exactly one Outcome.

    Closing this iterator early (client gone) closes the dispatcher's iterator,
    which cancels the generation on the worker.
    """
    matcher = StopMatcher(stops)
    completion_tokens = 0
    items = dispatcher.run(job, route)
    try:
        async for item in items:
            if isinstance(item, Delta):
                completion_tokens += len(item.token_ids)
                text, hit = matcher.feed(item.text)
                if text:
                    yield text
                if hit is not None:
                    yield Outcome("stop", hit, len(job.tokens), completion_tokens,
                                  route.cached, 0)
                    return
            else:
                rest = matcher.flush()
                if rest:
                    yield rest
                yield Outcome.from_completion(item)
                return
    finally:
        await items.aclose()


async def collect(dispatcher, job, route, stops: tuple[str, ...] = ()) -> tuple[str, Outcome]:
    """The whole text and the Outcome of a non-streaming request."""
    parts: list[str] = []
    outcome = None
    gen = generate(dispatcher, job, route, stops)
    try:
        async for item in gen:
            if isinstance(item, Outcome):
                outcome = item
            else:
                parts.append(item)
    finally:
        await gen.aclose()
    return "".join(parts), outcome
