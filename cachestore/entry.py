"""Index row value objects shared by the store and the eviction policy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from kvrouter.cachestore.keys import unpack_tokens


@dataclass(frozen=True)
class Entry:
    """One index row: a checkpoint of ``n_tokens`` tokens stored in one payload file.

    id: fresh unique hex id (also the payload file stem; never reused).
    kind: one of ``KINDS``.  namespace / model_id: part of every key (case C9).
    n_tokens: checkpoint length, tokens.  payload_name: file name under ``payloads/``.
    payload_bytes: payload size, bytes.  checksum: xxh3_64 hex digest of the payload file.
    created / last_used: unix seconds.  hits: times the checkpoint was reused (``touch``).
    text_preview: first ~80 characters of the text, for ``cache ls``.
    quarantined: empty for a usable row; otherwise the reason it is never returned again (C11).
    """

    id: str
    kind: str
    namespace: str
    model_id: str
    n_tokens: int
    payload_name: str
    payload_bytes: int
    checksum: str
    created: float
    last_used: float
    hits: int
    text_preview: str = ""
    quarantined: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Entry":
        return cls(**json.loads(bytes(raw)))


@dataclass(frozen=True)
class Hit:
    """Result of ``CheckpointStore.lookup``: the entry and its length in tokens (== entry.n_tokens)."""

    entry: Entry
    n_tokens: int


@dataclass(frozen=True)
class StoreEvent:
    """Something the store did, reported to ``CheckpointStore(on_event=...)`` listeners.

    action: "stored", "skipped", "evicted", "quarantined" or "removed".
    kind: the checkpoint kind; n_tokens: its length, tokens; n_bytes: payload size, bytes;
    seconds: time the action took (stores and skips), 0 otherwise; reason: why (skips,
    evictions, quarantines), e.g. "duplicate", "io_error", "budget".
    entry_id / namespace / model_id: the row acted on ("" for skips, which have none);
    packed_tokens: the checkpoint's token ids as `keys.pack_tokens` packs them, for
    "stored" only (empty otherwise); `token_ids` unpacks them when a listener needs them,
    so storing does not pay for it.
    """

    action: str
    kind: str
    n_tokens: int
    n_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    entry_id: str = ""
    namespace: str = ""
    model_id: str = ""
    packed_tokens: bytes = b""

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(unpack_tokens(self.packed_tokens))
