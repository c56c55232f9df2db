"""Continuous batching in a worker (issue 4): concurrent requests run together,
each finished request leaves a live state in its own batch slot, and a live
state whose slot is needed is written as an `evict` checkpoint before it is
dropped. One worker with 2 decode slots, through the official `openai` client.

Outputs are not compared across batch compositions (padding changes the sums
slightly); the single-request output checks live in test_slice.py.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from kvrouter.cachestore import CheckpointStore, StoreConfig
from tests.support.prompts import long_system_prompt
from tests.support.reference import chat_tokens
from tests.support.server import SMALL_KV_FLAGS, openai_client as client

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def server(start_server, kv_dir):
    return start_server("--kv-cache-dir", str(kv_dir), *SMALL_KV_FLAGS, "--decode-concurrency", "2",
                        "--prompt-concurrency", "2", name="batching")


def route_of(raw) -> dict[str, str]:
    header = raw.headers["x-kvrouter-route"]
    return dict(part.split("=", 1) for part in header.split("; "))


def ask(server, messages, max_tokens=2):
    raw = client(server).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    return route_of(raw), raw.parse()


def router_state(server) -> dict:
    with urllib.request.urlopen(f"{server.url}/v1/router/state", timeout=10) as r:
        return json.load(r)


def test_a_request_runs_while_another_is_decoding(server):
    """B arrives after A's first token and finishes before A does: the worker
    decodes them together (a one-at-a-time worker would finish A first)."""
    order: list[str] = []
    a_started = threading.Event()
    a_usage = {}

    def long_a():
        stream = client(server).chat.completions.create(
            model=MODEL, temperature=0, max_tokens=48, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Count from 1 to 100, separated by commas."}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not a_started.is_set():
                order.append("A first token")
                a_started.set()
            if chunk.usage is not None:
                a_usage["completion_tokens"] = chunk.usage.completion_tokens
        order.append("A done")

    t = threading.Thread(target=long_a)
    t.start()
    assert a_started.wait(120)
    _, b = ask(server, [{"role": "user", "content": "Say hi."}], max_tokens=2)
    order.append("B done")
    t.join(120)
    assert a_usage["completion_tokens"] == 48, "A must still have been decoding (no early stop)"
    assert b.choices[0].message.content
    assert order == ["A first token", "B done", "A done"]
    state = router_state(server)["workers"][0]
    assert state["load"]["slots"] == 2


def test_each_session_keeps_its_live_state_in_its_own_slot(server):
    """Two interleaved sessions both continue from live state: with one slot the
    second session would have replaced the first one's state. The second reuses
    the first one's shared opening without taking its state away."""
    s1 = [{"role": "system", "content": long_system_prompt(6, project="Kestrel")},
          {"role": "user", "content": "Name one rule."}]
    s2 = [{"role": "system", "content": long_system_prompt(6, project="Osprey")},
          {"role": "user", "content": "Name one rule."}]
    _, r1 = ask(server, s1)
    route2, r2 = ask(server, s2)
    assert route2["source"] == "live" and r2.usage.prompt_tokens_details.cached_tokens > 0  # the shared opening
    lives = router_state(server)["workers"][0]["cache"]["live_states"]
    assert len(lives) == 2, lives
    for first, msgs in ((r1, s1), (r2, s2)):
        follow = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And another?"}]
        route, resp = ask(server, follow)
        assert route["source"] == "live", route
        # Reused at least everything the client sent in the first turn.
        assert resp.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_a_dropped_slot_is_stored_as_an_evict_checkpoint(server, kv_dir):
    """A third unrelated session needs a slot: the least recently used live state
    is dropped, after its `evict` checkpoint of exactly what its client sent."""
    sessions = [[{"role": "system", "content": long_system_prompt(12, project=p)},
                 {"role": "user", "content": "Hello there."}] for p in ("Heron", "Plover", "Curlew")]
    assert len(chat_tokens(sessions[0])) > 300, "evict checkpoints need --kv-cache-min-tokens (256)"
    first_prompt = chat_tokens(sessions[0])
    for msgs in sessions:
        ask(server, msgs)
    with CheckpointStore(StoreConfig(directory=kv_dir)) as store:
        evicts = [e for e in store.entries() if e.kind == "evict"]
        hit = store.lookup(store.entries()[0].model_id, "", first_prompt)
    assert any(e.n_tokens == len(first_prompt) for e in evicts), [(e.kind, e.n_tokens) for e in evicts]
    assert hit is not None and hit.n_tokens == len(first_prompt)
    route, resp = ask(server, sessions[0])
    assert route["source"] in ("ram", "disk"), route  # the live state is gone; its checkpoint is not
    assert resp.usage.prompt_tokens_details.cached_tokens == len(first_prompt) - 1
