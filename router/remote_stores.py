"""The router's in-memory view of checkpoint stores it cannot open: other hosts'.

A store is one directory on one host; the router reads its own host's LMDB
index directly, but a worker on another host (`--remote-worker`) reads a store
the router never sees. That host's workers say what it holds: `ListCheckpoints`
(every usable entry with its token ids; the router rebuilds its view from it
whenever a worker's event stream (re)starts or skips a number) and
`checkpoint` cache events (each store, eviction, quarantine a worker makes).

`RemoteStores` keeps one `StoreView` per store id ("host:directory"). A view
answers "the longest stored prefix of these tokens, in this namespace, for this
model" with dictionary reads along the prompt's chained block hashes (the keys
of `cachestore.keys`, the same the LMDB index registers rows under), never a
scan of the entries; a candidate is confirmed on exact token ids.

Removals made outside a worker (`kvrouter cache rm`, `cache gc`) send no event;
the view corrects itself at the next rebuild.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kvrouter.cachestore import keys

log = logging.getLogger("kvrouter.router.remote_stores")

REBUILD_YIELD_EVERY = 64  # entries added between returns to the event loop while rebuilding


@dataclass(frozen=True)
class Checkpoint:
    """One entry of a store as a worker reports it.

    entry_id: the store's id (also the RAM tier's key). namespace / model_identity:
    part of its key (`ModelInfo.identity`). kind: "anchor", "waypoint", "evict" or
    "shutdown". token_ids: its tokens (empty in removal events). n_tokens: its
    length in tokens. payload_bytes: what loading it reads, bytes.
    """

    entry_id: str
    namespace: str
    model_identity: str
    kind: str = ""
    token_ids: tuple[int, ...] = ()
    n_tokens: int = 0
    payload_bytes: int = 0


def is_remote(store_id: str, local_store_id: str) -> bool:
    """True when a worker reading `store_id` reads a store other than the router's own
    (`local_store_id`, "" when the router opens none): its view comes from events."""
    return bool(store_id) and store_id != local_store_id


class StoreView:
    """The usable entries of one store, keyed like `cachestore.index`: an entry of
    n = q*64 + r tokens holds a reference on chain nodes c_0..c_q and is registered
    under c_q with (r, tail hash). Memory: its packed tokens (4 bytes per token)
    plus one dictionary slot per 64-token block not shared with another entry."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Checkpoint, bytes]] = {}
        self._refs: dict[bytes, int] = {}
        self._regs: dict[bytes, dict[str, tuple[int, bytes]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._entries

    @property
    def payload_bytes(self) -> int:
        """Sum of the entries' payload sizes, bytes."""
        return sum(cp.payload_bytes for cp, _ in self._entries.values())

    def add(self, cp: Checkpoint) -> bool:
        """Adds an entry (its `token_ids` must be set). Returns False when it is there
        already (ids are never reused, so a repeated add changes nothing) or has no tokens."""
        if cp.entry_id in self._entries or not cp.token_ids:
            return False
        packed = keys.pack_tokens(cp.token_ids)
        cp = Checkpoint(cp.entry_id, cp.namespace, cp.model_identity, cp.kind, (), len(cp.token_ids),
                        cp.payload_bytes)  # tokens are kept packed only
        path = keys.path_nodes(keys.root_key(cp.model_identity, cp.namespace), packed)
        for node in path:
            self._refs[node] = self._refs.get(node, 0) + 1
        q, r = keys.split(cp.n_tokens)
        tail = keys.tail_hash(path[q], packed[q * keys.BLOCK_TOKENS * 4:])
        self._regs.setdefault(path[q], {})[cp.entry_id] = (r, tail)
        self._entries[cp.entry_id] = (cp, packed)
        return True

    def remove(self, entry_id: str) -> Checkpoint | None:
        """Drops an entry; returns it, or None when it was not there."""
        found = self._entries.pop(entry_id, None)
        if found is None:
            return None
        cp, packed = found
        path = keys.path_nodes(keys.root_key(cp.model_identity, cp.namespace), packed)
        q, _ = keys.split(cp.n_tokens)
        regs = self._regs.get(path[q], {})
        regs.pop(entry_id, None)
        if not regs:
            self._regs.pop(path[q], None)
        for node in path:
            left = self._refs[node] - 1
            if left:
                self._refs[node] = left
            else:
                del self._refs[node]
        return cp

    def apply(self, cp: Checkpoint, added: bool) -> None:
        """One change: `cp` was stored (added) or removed."""
        if added:
            self.add(cp)
        else:
            self.remove(cp.entry_id)

    def longest(self, model_identity: str, namespace: str, tokens: Sequence[int]) -> Checkpoint | None:
        """The longest entry whose tokens are exactly a prefix of `tokens` (length at
        most len(tokens)), same model and namespace; None when none. Cost: one hash and
        one dictionary read per 64-token block up to the deepest stored block, then the
        registrations of the nodes on the way back."""
        root = keys.root_key(model_identity, namespace)
        if root not in self._refs:
            return None
        packed = keys.pack_tokens(tokens)
        chain = [root]
        for node in keys.iter_nodes(root, packed):
            if node not in self._refs:
                break
            chain.append(node)

        def regs_at(k: int):
            return [(r, tail, entry_id) for entry_id, (r, tail) in self._regs.get(chain[k], {}).items()]

        def confirm(entry_id: str, n: int) -> Checkpoint | None:
            cp, stored = self._entries[entry_id]
            return cp if stored == packed[: 4 * n] else None

        return keys.search_registrations(chain, len(chain) - 1, packed, regs_at, confirm)


class RemoteStores:
    """One `StoreView` per remote store id, fed by the events of every worker that
    reads that store and rebuilt from any one of them (`rebuild`)."""

    def __init__(self) -> None:
        self.views: dict[str, StoreView] = {}
        self._recording: dict[str, list[list[tuple[Checkpoint, bool]]]] = {}

    def view(self, store_id: str) -> StoreView:
        v = self.views.get(store_id)
        if v is None:
            v = self.views[store_id] = StoreView()
        return v

    def apply(self, store_id: str, cp: Checkpoint, added: bool) -> None:
        """A worker reading `store_id` stored (added) or removed `cp`."""
        self.view(store_id).apply(cp, added)
        for changes in self._recording.get(store_id, ()):
            changes.append((cp, added))

    def longest(self, store_id: str, model_identity: str, namespace: str,
                tokens: Sequence[int]) -> Checkpoint | None:
        """`StoreView.longest` of that store (None for a store never heard of)."""
        v = self.views.get(store_id)
        return v.longest(model_identity, namespace, tokens) if v is not None else None

    async def rebuild(self, store_id: str, listing: AsyncIterator[Checkpoint]) -> int:
        """Replaces the view of `store_id` with the entries of `listing` (a worker's
        ListCheckpoints, taken after this call starts), then replays the changes other
        workers reported meanwhile, in order (adds and removals by id are idempotent,
        so a change the listing already shows changes nothing). The old view keeps
        serving until the new one is complete; when `listing` raises, it stays and the
        exception propagates. Returns the number of entries listed."""
        changes: list[tuple[Checkpoint, bool]] = []
        self._recording.setdefault(store_id, []).append(changes)
        fresh = StoreView()
        listed = 0
        try:
            async for cp in listing:
                fresh.add(cp)
                listed += 1
                if listed % REBUILD_YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        finally:
            recording = self._recording[store_id]
            recording.remove(changes)
            if not recording:
                del self._recording[store_id]
        for cp, added in changes:
            fresh.apply(cp, added)
        self.views[store_id] = fresh
        log.info("store %s: view rebuilt with %d entries", store_id, len(fresh))
        return listed
