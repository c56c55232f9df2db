"""The live states a batching worker keeps in memory between requests.

A worker decodes up to `decode_concurrency` sequences together, one per batch
slot. When a request finishes, its KV state stays in memory as a live state,
so the next turn of the same conversation continues from it at no load cost.
Live states and running requests share the slots: a new request that needs a
slot takes it from the least recently used live state, and that state is
dropped (the engine writes its `evict` checkpoint first). Idle live states are
also bounded in bytes (`max_bytes`), because on a large model one long
context is gigabytes.

Each live state has an id, unique in the process, that cache events and the
router use to tell them apart.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class LiveState:
    """The model state kept in memory after a request.

    tokens: the token ids fed into `caches` (every layer's mlx-lm cache), so the
    state holds exactly len(tokens) tokens (`held`); a recurrent layer has no count
    of its own, this is it.
    prompt_tokens: how many of them the client sent (the rest were generated);
    the client-sent part is what comes back verbatim in the next turn, so
    `evict` and `shutdown` checkpoints stop there (generated text may
    re-tokenize differently when sent back, case C7).
    prompt_state: for a model whose states cannot be cut back (recurrent layers,
    sliding windows), a copy of the state where the client-sent part ended (holding
    exactly `prompt_tokens` tokens, taken when the prefill got there): the next turn
    resumes from it when it diverges inside the generated part, and the `evict` and
    `shutdown` checkpoints are written from it. None where states can be cut back.
    writing: the checkpoint write (a `WriteJob`) whose snapshot this state is, until
    the writer has written it: such a state is never in `LiveStates`; it is only
    copied (never taken), under the job's `guard`. None for a live state proper.
    """

    namespace: str
    tokens: list[int]
    caches: list
    prompt_tokens: int
    preview: str = ""
    live_id: int = 0  # set by `LiveStates.add`
    prompt_state: list | None = None
    writing: object | None = None

    @property
    def held(self) -> int:
        """Tokens the state holds."""
        return len(self.tokens)


def state_bytes(live: LiveState) -> int:
    """Memory held by a live state's caches (and its prompt state), bytes."""
    return sum(c.nbytes for c in live.caches) + sum(c.nbytes for c in live.prompt_state or ())


class LiveStates:
    """Idle live states, least recently used first.

    slots: batch slots shared by running requests and idle live states (>= 1).
    max_bytes: bound on the idle states' memory, bytes (0: no bound).
    Not thread-safe: used on the engine thread only (readers elsewhere take
    `snapshot()`, a tuple that is replaced, never mutated).
    """

    def __init__(self, slots: int, max_bytes: int = 0):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.max_bytes = max_bytes
        self._states: OrderedDict[int, LiveState] = OrderedDict()
        self._ids = itertools.count(1)
        self.snapshot: tuple[LiveState, ...] = ()

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self):
        return iter(list(self._states.values()))

    @property
    def bytes(self) -> int:
        return sum(state_bytes(s) for s in self._states.values())

    def add(self, live: LiveState) -> LiveState:
        """Keeps `live` as the most recently used state; gives it a new id."""
        live.live_id = next(self._ids)
        self._states[live.live_id] = live
        self._publish()
        return live

    def take(self, live: LiveState) -> None:
        """Removes `live` (a request continues from it; its state moves into the batch)."""
        self._states.pop(live.live_id, None)
        self._publish()

    def to_drop(self, running: int) -> list[LiveState]:
        """Removes and returns the least recently used states until `running`
        requests plus the idle states fit the slots and the idle states fit
        `max_bytes`. The caller writes their `evict` checkpoints."""
        dropped = []
        while self._states and (len(self._states) + running > self.slots
                                or (self.max_bytes and self.bytes > self.max_bytes)):
            dropped.append(self._states.popitem(last=False)[1])
        if dropped:
            self._publish()
        return dropped

    def clear(self) -> list[LiveState]:
        """Removes and returns every state."""
        out = list(self._states.values())
        self._states.clear()
        self._publish()
        return out

    def _publish(self) -> None:
        self.snapshot = tuple(self._states.values())
