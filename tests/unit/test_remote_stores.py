"""router.remote_stores: the router's view of another host's store (add, remove,
longest stored prefix without a scan, namespace and model isolation, rebuild
from a listing while other workers' events keep coming)."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvrouter.router.remote_stores import Checkpoint, RemoteStores, StoreView, is_remote


def toks(n: int, seed: int = 0) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(50_000) for _ in range(n))


def cp(tokens, entry_id=None, namespace="ns", model="m", payload_bytes=1000) -> Checkpoint:
    return Checkpoint(entry_id or f"e{len(tokens)}-{namespace}-{model}", namespace, model, "anchor", tuple(tokens),
                      len(tokens), payload_bytes)


class NoScan(dict):
    """The entries of a view; iterating them fails (a lookup must never scan)."""

    def __iter__(self):
        raise AssertionError("scanned the entries")

    values = items = keys = __iter__


def test_longest_stored_prefix_of_a_prompt():
    prompt = toks(1000)
    v = StoreView()
    for n in (30, 64, 128, 700, 1000, 1001):
        v.add(cp(prompt[:n] if n <= 1000 else prompt + (7,)))
    v.add(cp(prompt[:500] + (1,) + prompt[501:900], "diverges"))  # differs at token 500
    v._entries = NoScan(v._entries)
    assert v.longest("m", "ns", prompt).n_tokens == 1000
    assert v.longest("m", "ns", prompt[:999]).n_tokens == 700
    assert v.longest("m", "ns", prompt[:700]).entry_id == "e700-ns-m"
    assert v.longest("m", "ns", prompt[:127]).n_tokens == 64  # a whole block, no tail
    assert v.longest("m", "ns", prompt[:63]).n_tokens == 30
    assert v.longest("m", "ns", prompt[:29]) is None
    assert v.longest("m", "ns", toks(1000, seed=1)) is None
    # a differing token stops reuse there, whatever block it falls in
    other = prompt[:650] + (3,) + prompt[651:]
    assert v.longest("m", "ns", other).n_tokens == 128
    hit = v.longest("m", "ns", prompt)
    assert (hit.payload_bytes, hit.kind, hit.namespace, hit.model_identity) == (1000, "anchor", "ns", "m")


def test_namespaces_and_models_never_share_entries():
    prompt = toks(300)
    v = StoreView()
    v.add(cp(prompt[:200], namespace="alice"))
    v.add(cp(prompt[:100], namespace="bob", model="m2"))
    assert v.longest("m", "alice", prompt).n_tokens == 200
    assert v.longest("m", "bob", prompt) is None
    assert v.longest("m2", "alice", prompt) is None
    assert v.longest("m2", "bob", prompt).n_tokens == 100
    assert v.longest("m", "", prompt) is None


def test_remove_drops_an_entry_and_keeps_the_others():
    prompt = toks(400)
    v = StoreView()
    short, long_ = cp(prompt[:130]), cp(prompt[:300])
    assert v.add(short) and v.add(long_) and not v.add(long_)  # a repeated add changes nothing
    assert len(v) == 2 and v.payload_bytes == 2000
    assert v.remove(long_.entry_id).n_tokens == 300
    assert v.longest("m", "ns", prompt).entry_id == short.entry_id
    assert v.remove(long_.entry_id) is None  # removing twice is harmless
    v.apply(Checkpoint(short.entry_id, "ns", "m", n_tokens=130), added=False)  # a removal event has no tokens
    assert v.longest("m", "ns", prompt) is None and len(v) == 0
    assert v._refs == {} and v._regs == {}  # nothing left behind


def test_is_remote():
    assert is_remote("hostB:/kv", "hostA:/kv") and is_remote("hostB:/kv", "")
    assert not is_remote("hostA:/kv", "hostA:/kv") and not is_remote("", "hostA:/kv")


async def listing(entries, gate: asyncio.Event | None = None, fail: bool = False):
    for i, e in enumerate(entries):
        if i == 1 and gate is not None:
            await gate.wait()
        yield e
    if fail:
        raise RuntimeError("stream broke")


async def test_rebuild_replaces_the_view_and_replays_changes_reported_meanwhile():
    prompt = toks(600)
    stores = RemoteStores()
    stale = cp(prompt[:100], "stale")
    stores.apply("B", stale, True)  # removed by `kvrouter cache rm`: no event ever came
    a, b, c = cp(prompt[:200], "a"), cp(prompt[:300], "b"), cp(prompt[:400], "c")
    gate = asyncio.Event()
    task = asyncio.create_task(stores.rebuild("B", listing([a, b], gate)))
    await asyncio.sleep(0)
    # meanwhile another worker of store B reports: c stored, b evicted
    stores.apply("B", c, True)
    stores.apply("B", Checkpoint("b", "ns", "m", n_tokens=300), False)
    assert stores.longest("B", "m", "ns", prompt).entry_id == "c"  # the old view keeps serving
    gate.set()
    assert await task == 2
    assert set(stores.views["B"]._entries) == {"a", "c"}  # stale gone, b removed, c kept
    assert stores.longest("B", "m", "ns", prompt).entry_id == "c"
    assert stores.longest("A", "m", "ns", prompt) is None  # another store knows nothing of it
    assert stores._recording == {}


async def test_a_broken_listing_keeps_the_old_view():
    prompt = toks(300)
    stores = RemoteStores()
    stores.apply("B", cp(prompt[:200], "a"), True)
    with pytest.raises(RuntimeError):
        await stores.rebuild("B", listing([cp(prompt[:100], "x")], fail=True))
    assert stores.longest("B", "m", "ns", prompt).entry_id == "a"
    assert stores._recording == {}
