"""The checkpoint store's policy through the HTTP API, on the real default model,
asserted in tokens with the replay helper. Token counts of the shared store
cases are scaled down (the default model's context is 8,192 tokens), keeping
their proportions: interval 512, alignment 128, trim 16, min 128, cold max 1000.
"""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvrouter.cachestore import CheckpointStore, StoreConfig
from tests.support.prompts import env_block, long_system_prompt, tool_block
from tests.support.reference import chat_tokens, greedy_in_subprocess, reference_model
from tests.support.replay import Step, replay
from tests.support.server import STORE_CASE_FLAGS, openai_client as client, pid_alive

MODEL = "SmolLM2-135M-Instruct"
FLAGS = [*STORE_CASE_FLAGS, "--kv-cache-cold-max-tokens", "1000"]


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def servers(start_server, kv_dir):
    return {"s": start_server("--kv-cache-dir", str(kv_dir), *FLAGS, name="policy")}




def system_tokens(system: str) -> int:
    """Length in tokens of the rendered system turn: the cold anchor of a prompt
    that starts with it."""
    _, tok = reference_model()
    text = tok.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    return len(tok.encode(text, add_special_tokens=False))


def stored(kv_dir, kind: str | None = None):
    with CheckpointStore(StoreConfig(directory=kv_dir)) as store:
        return [e for e in store.entries() if kind is None or e.kind == kind]


def metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def other_user(i: int) -> Step:
    """An unrelated request: replaces the worker's live state, so the next
    session can only reuse what the store holds."""
    return Step(f"other{i}", [{"role": "user", "content": f"Say the number {i}."}], max_tokens=2)


def session(system: str, question: str, label: str) -> Step:
    return Step(label, [{"role": "system", "content": system}, {"role": "user", "content": question}])


def test_agent_scenario_reaches_anchor_hits_after_a_rewrite(servers, kv_dir):
    """Case C1 scaled: tools block, then an environment block rewritten between
    sessions just before the anchor, a waypoint already stored below it."""
    tools = tool_block()
    v1, v2 = f"{tools}\n{env_block(1)}", f"{tools}\n{env_block(2)}"
    anchor_v2 = system_tokens(v2)
    assert 512 < anchor_v2 < 1000, "the anchor must lie past the first waypoint and under cold max"
    steps = [
        session(v1, "List the tools.", "s1"),
        other_user(1),
        session(v2, "Which files changed?", "s2"),
        other_user(2),
        session(v2, "Read part 3.", "s3"),
        other_user(3),
        session(v2, "Read part 4.", "s4"),
    ]
    rec = replay(client(servers["s"]), MODEL, steps)
    assert rec["s1"].cached_tokens == 0
    # Fresh session after the rewrite: only the waypoint below the rewritten block matches...
    assert rec["s2"].cached_tokens == 512
    # ...and it stores the new anchor during its prefill, so every later fresh session hits it.
    assert rec["s3"].cached_tokens == anchor_v2
    assert rec["s4"].cached_tokens == anchor_v2
    s3_tokens = chat_tokens(steps[4].messages)
    with CheckpointStore(StoreConfig(directory=kv_dir)) as store:
        anchors = [e for e in store.entries() if e.kind == "anchor"
                   and store.tokens_of(e.id) == s3_tokens[: e.n_tokens]]
    assert [a.n_tokens for a in anchors] == [anchor_v2], "exactly one anchor row for the new prefix"


def test_cold_max_is_checked_against_the_anchor_not_the_prompt(servers):
    """Case C2 scaled: a prompt longer than cold max whose anchor is under it."""
    system = long_system_prompt(28, project="Borealis")  # ~680 tokens
    anchor = system_tokens(system)
    question = "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 45  # ~450 tokens
    s = client(servers["s"])
    rec = replay(s, MODEL, [session(system, question, "a"), other_user(4), session(system, question, "b")])
    assert rec["a"].prompt_tokens > 1000 > anchor
    assert rec["b"].cached_tokens >= anchor


def test_an_anchor_over_cold_max_is_skipped_logged_and_counted(servers):
    system = long_system_prompt(48, project="Cygnus")  # ~1150 tokens > cold max 1000
    before = metric(servers["s"], "kvrouter_checkpoint_events_total", action="skipped", reason="over_cold_max")
    rec = replay(client(servers["s"]), MODEL, [session(system, "Hi.", "c")])
    assert rec["c"].prompt_tokens > 1000
    after = metric(servers["s"], "kvrouter_checkpoint_events_total", action="skipped", reason="over_cold_max")
    assert after == before + 1
    assert "reason=over_cold_max" in servers["s"].log_path.read_text()


def test_deep_waypoint_and_shutdown_checkpoint_hit_across_restarts(servers, start_server, kv_dir):
    """Cases C3 and C5: a waypoint past cold max loads again and again across
    worker restarts (loading never deletes by size), and the checkpoint written
    at a clean stop is found after the restart."""
    system = long_system_prompt(48, project="Draco")  # ~1150 tokens: waypoints at 512 and 1024
    history = [{"role": "system", "content": system}, {"role": "user", "content": "Name the project."}]
    first = replay(client(servers["s"]), MODEL, [Step("first", history)])["first"]
    waypoints = {e.n_tokens for e in stored(kv_dir, "waypoint")}
    assert 1024 in waypoints
    for restart in range(2):
        old = servers["s"]
        pids = list(old.worker_pids)
        assert old.stop() == 0
        assert not any(pid_alive(p) for p in pids)
        if restart == 0:  # SIGTERM wrote the shutdown checkpoint of the live state
            assert first.prompt_tokens in {e.n_tokens for e in stored(kv_dir, "shutdown")}
        servers["s"] = start_server("--kv-cache-dir", str(kv_dir), *FLAGS, name=f"policy-restart{restart}")
        c = client(servers["s"])
        again = replay(c, MODEL, [Step("same", history)])["same"]
        assert again.cached_tokens == first.prompt_tokens - 1  # whole-prompt hit: last token fed again
        deeper = [{"role": "system", "content": system}, {"role": "user", "content": f"Rule {restart + 7}?"}]
        other = replay(c, MODEL, [Step("deep", deeper)])["deep"]
        assert other.cached_tokens >= 1024
    assert 1024 in {e.n_tokens for e in stored(kv_dir, "waypoint")}, "a load must never delete the waypoint"


def pad_to(target: int, system: str) -> list[dict]:
    """Messages whose rendered prompt is exactly `target` tokens."""
    words = []
    while True:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": " ".join(["Hi"] + words)}]
        n = len(chat_tokens(msgs))
        if n == target:
            return msgs
        assert n < target, f"cannot hit {target} exactly (got {n})"
        words.append("ok")


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_whole_prompt_checkpoint_at_a_frontier_gives_uncached_output(servers, offset):
    """Case C6: prompts of a frontier's length, one below and one above; the
    stored prefix covers all (or all but one) of the prompt. Output equals an
    uncached greedy run token for token."""
    system = long_system_prompt(20, project=f"Eridanus{offset + 1}")  # ~495 tokens
    msgs = pad_to(512 + offset, system)
    s = client(servers["s"])
    rec = replay(s, MODEL, [Step("cold", msgs, 8), other_user(10 + offset), Step("warm", msgs, 8)])
    assert rec["cold"].prompt_tokens == 512 + offset
    assert rec["warm"].cached_tokens == rec["warm"].prompt_tokens - 1
    ref = greedy_in_subprocess(msgs, 8)
    assert ref.min_margin > 1e-3
    assert rec["warm"].text == rec["cold"].text == ref.text


def test_namespaces_never_share_state(servers):
    """Case C9: the same prompt in two namespaces reuses nothing, from the live
    state or the store; the same namespace reuses (the positive control)."""
    system = long_system_prompt(16, project="Lacerta")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}]

    def in_ns(ns: str) -> openai.OpenAI:
        return client(servers["s"], default_headers={"x-kvrouter-namespace": ns})

    alice = replay(in_ns("alice"), MODEL, [Step("a1", msgs)])["a1"]
    bob = replay(in_ns("bob"), MODEL, [Step("b1", msgs)])["b1"]  # right after alice: her live state is there
    assert alice.cached_tokens == 0
    assert bob.cached_tokens == 0
    again = replay(in_ns("alice"), MODEL, [Step("a2", msgs)])["a2"]  # bob's live state now; alice's store
    assert again.cached_tokens >= system_tokens(system)
    assert again.text == alice.text


def test_ram_tier_serves_a_recent_checkpoint_without_reading_the_disk(servers, kv_dir):
    """Rule 9: lookup order live, RAM tier, disk. A checkpoint just written stays
    in memory: the next request that needs it takes it from there. (The request that
    displaced the live state does not wait for its `evict` checkpoint's write, so the
    test waits for it to be stored before the next request; one arriving while it is
    still being written reuses the anchor below it instead.)"""
    system = long_system_prompt(12, project="Monoceros")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}]
    before = metric(servers["s"], "kvrouter_prompt_tokens_total", source="ram")
    evicts = len(stored(kv_dir, "evict"))
    rec = replay(client(servers["s"]), MODEL, [Step("cold", msgs, 2), other_user(20)])
    deadline = time.monotonic() + 60
    while len(stored(kv_dir, "evict")) == evicts and time.monotonic() < deadline:
        time.sleep(0.05)
    rec.update(replay(client(servers["s"]), MODEL, [Step("warm", msgs, 2)]))
    assert rec["warm"].cached_tokens == rec["warm"].prompt_tokens - 1  # the evict checkpoint of "cold"
    after = metric(servers["s"], "kvrouter_prompt_tokens_total", source="ram")
    assert after - before == rec["warm"].cached_tokens
