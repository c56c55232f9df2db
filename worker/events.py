"""What a generation request is, and the events the engine streams back for it.

These are plain frozen dataclasses, independent of gRPC: the servicer
translates them to and from `kvrouter_proto.worker_pb2` messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters. temperature 0 is greedy; top_p 1.0 is off."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One request for the engine.

    prompt: token ids of the whole rendered prompt.
    namespace: cache tenant; checkpoints and live state are reused only within it.
    anchor_tokens: length in tokens of the stable chat prefix (the cold-anchor
        candidate), 0 when unknown.
    text_preview: first characters of the prompt, kept with checkpoints.
    hint_tokens: positions (tokens, each < len(prompt)) where the client marked the end of
        a stable prefix; candidate checkpoint positions (`cachestore.plan_stores`).
    """

    request_id: str
    prompt: tuple[int, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    namespace: str = ""
    anchor_tokens: int = 0
    text_preview: str = ""
    hint_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token accounting of one request (counts in tokens, times in seconds).

    cache_source is one of "none", "live", "ram", "disk".
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_source: str
    prefill_seconds: float = 0.0
    load_seconds: float = 0.0
    loaded_bytes: int = 0  # payload bytes of the checkpoint restored (RAM tier or disk)
    load_stages: tuple[float, float, float] | None = None  # a disk load's (read, device, build) seconds

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens this request computed (not sent: the router subtracts)."""
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class TokenEvent:
    """Newly generated tokens and the text they complete (may be empty mid-character).

    reuse: on a request's first token only, (prompt tokens reused, their source:
    "none", "live", "ram" or "disk"): the reuse that really happened, known before
    the Final (a client that stops early still learns it); None on later events.
    """

    token_ids: tuple[int, ...]
    text: str
    reuse: tuple[int, str] | None = None


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a successful request. finish_reason: "stop", "length" or "cancelled".

    store_events: what the checkpoint store did for this request (`cachestore.StoreEvent`).
    live_id: the live state the request left behind on the worker (0: none).
    """

    finish_reason: str
    usage: Usage
    store_events: tuple = ()
    live_id: int = 0


@dataclass(frozen=True)
class ErrorEvent:
    """The last event of a failed request; message is safe to show a client."""

    message: str


Event = TokenEvent | FinishEvent | ErrorEvent
