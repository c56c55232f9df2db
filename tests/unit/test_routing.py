"""The routing cost model (router.routing) on snapshots: no I/O, no workers."""

from kvrouter.cachestore.costs import Rates, Reuse, load_seconds, prefill_seconds, should_load
from kvrouter.router.routing import Candidate, best_reuse, choose_worker, queue_wait_s

CPU = Rates(prefill_tps=250, disk_bps=0.5e9, ram_bps=10e9)


def test_prediction_is_queue_plus_load_plus_remaining_prefill():
    live = Candidate("w0", True, 0, (Reuse("live", 800),), CPU)
    disk = Candidate("w1", True, 0, (Reuse("disk", 800, 800 * 46_000),), CPU)
    d = choose_worker([disk, live], 1000)
    assert (d.worker, d.source, d.cached_tokens, d.reason) == ("w0", "live", 800, "live_prefix")
    assert abs(d.predicted_ttft_s - 200 / 250) < 1e-9
    # the disk copy costs its bytes over the measured bandwidth
    assert abs(load_seconds(Reuse("disk", 800, 800 * 46_000), CPU) - 0.0736) < 1e-9
    assert abs(load_seconds(Reuse("ram", 800, 800 * 46_000), CPU) - 0.00368) < 1e-9


def test_queue_wait_outweighs_reuse():
    busy_live = Candidate("w0", True, 2, (Reuse("live", 900),), CPU, queued_s=10.0)
    idle = Candidate("w1", True, 0, (), CPU)
    d = choose_worker([busy_live, idle], 1000)
    assert d.worker == "w1" and d.source == "none" and d.reason == "least_loaded"


def test_ties_go_to_fewer_in_flight_then_name():
    a = Candidate("w0", True, 1, (), CPU)
    b = Candidate("w1", True, 0, (), CPU)
    assert choose_worker([a, b], 100).worker == "w1"
    assert choose_worker([Candidate("w1", True, 0, (), CPU), Candidate("w0", True, 0, (), CPU)], 100).worker == "w0"


def test_affinity_never_becomes_a_hot_spot():
    # w0 holds the prefix but is at the affinity bound: it is costed as holding nothing
    hot = Candidate("w0", True, 4, (Reuse("live", 990),), Rates(prefill_tps=1e9), queued_s=0.0)
    idle = Candidate("w1", True, 0, (), Rates(prefill_tps=1e9))
    assert choose_worker([hot, idle], 1000, affinity_max_in_flight=4).worker == "w1"


def test_full_workers_take_nothing_and_all_full_is_overloaded():
    full = Candidate("w0", True, 8, (Reuse("live", 990),), CPU, queued_s=4.0, max_queue=8)
    open_ = Candidate("w1", True, 7, (), CPU, queued_s=40.0, max_queue=8)
    assert choose_worker([full, open_], 1000).worker == "w1"
    d = choose_worker([full], 1000)
    assert d.worker == "" and d.reason == "overloaded" and d.retry_after_s >= 1


def test_unhealthy_and_excluded_workers_get_nothing():
    sick = Candidate("w0", False, 0, (Reuse("live", 990),), CPU)
    ok = Candidate("w1", True, 3, (), CPU, queued_s=9.0)
    assert choose_worker([sick, ok], 1000).worker == "w1"
    assert choose_worker([sick, ok], 1000, exclude=frozenset({"w1"})).reason == "unavailable"


def test_load_or_recompute_follows_measured_speeds():
    # H200-like: 4.2 GB at 1.1 GB/s (3.8 s) vs 32K tokens at 16K tok/s (2 s): recompute
    gpu = Rates(prefill_tps=16_000, disk_bps=1.1e9)
    big = Reuse("disk", 32_768, int(4.2e9))
    assert not should_load(big, 0, gpu)
    # Mac/CPU-like: the same checkpoint loads far faster than 250 tok/s prefill
    assert should_load(big, 0, Rates(prefill_tps=250, disk_bps=1.1e9))
    # only the tokens beyond what the worker already has count
    assert not should_load(Reuse("disk", 1000, 10**6), 1000, CPU)
    assert best_reuse([big], 40_000, gpu)[0].source == "none"
    assert prefill_seconds(500, Rates()) > 0  # priors apply until measured


def test_another_hosts_checkpoint_is_not_an_option():
    # the cluster never offers a disk option to a worker reading another store; without options: recompute
    remote = Candidate("r0", True, 0, (), CPU)
    local = Candidate("w0", True, 0, (Reuse("disk", 900, 900 * 46_000),), CPU)
    d = choose_worker([remote, local], 1000)
    assert d.worker == "w0" and d.source == "disk"


def test_a_batching_worker_with_a_free_slot_makes_a_request_wait_only_for_prefills_ahead():
    # 3 requests in flight, 12 s of predicted work, 2 s of it prefill not yet done.
    batching = Candidate("w0", True, 3, (), CPU, queued_s=12.0, slots=4, prefill_backlog_s=2.0)
    serial = Candidate("w1", True, 3, (), CPU, queued_s=12.0, slots=1, prefill_backlog_s=2.0)
    assert queue_wait_s(batching) == 2.0
    assert queue_wait_s(serial) == 12.0  # one slot: it waits for everything dispatched
    # every slot taken: add the time until one frees (mean service 3 s, 4 slots, first in line)
    full = Candidate("w2", True, 4, (), CPU, queued_s=12.0, slots=4, prefill_backlog_s=2.0)
    assert abs(queue_wait_s(full) - (2.0 + 3.0 * 1 / 4)) < 1e-9
    d = choose_worker([serial, batching], 1000)
    assert d.worker == "w0" and abs(d.predicted_ttft_s - (2.0 + 1000 / 250)) < 1e-9


def test_prompt_cache_key_worker_wins_within_the_slack_only():
    from kvrouter.router.routing import AFFINITY_SLACK_S

    a = Candidate("w0", True, 0, (), CPU)  # 1000 tokens: 4.0 s
    b = Candidate("w1", True, 1, (), CPU, prefill_backlog_s=0.3, slots=4)  # 4.3 s: within 10 %
    assert choose_worker([a, b], 1000).worker == "w0"
    d = choose_worker([a, b], 1000, prefer="w1")
    assert d.worker == "w1" and d.affinity
    far = Candidate("w1", True, 1, (), CPU, prefill_backlog_s=2.0, slots=4)  # 6.0 s: not close
    d = choose_worker([a, far], 1000, prefer="w1")
    assert d.worker == "w0" and not d.affinity
    # short prompts: the slack is at least AFFINITY_SLACK_S
    near = Candidate("w1", True, 1, (), CPU, prefill_backlog_s=AFFINITY_SLACK_S / 2, slots=4)
    assert choose_worker([a, near], 10, prefer="w1").worker == "w1"
    # an excluded (already tried) or full worker is never preferred
    assert choose_worker([a, b], 1000, exclude=frozenset({"w1"}), prefer="w1").worker == "w0"
    full = Candidate("w1", True, 2, (), CPU, max_queue=2)
    assert choose_worker([a, full], 1000, prefer="w1").worker == "w0"


def test_affinity_map_is_bounded_and_scoped():
    from kvrouter.router.affinity import AffinityMap

    m = AffinityMap(max_keys=2)
    m.remember("m", "", "k1", "w0")
    m.remember("m", "", "k2", "w1")
    assert m.worker_for("m", "", "k1") == "w0"
    assert m.worker_for("m", "tenant", "k1") == "" and m.worker_for("other", "", "k1") == ""  # never across
    m.remember("m", "", "k3", "w1")  # the least recently remembered key (k1) is forgotten
    assert len(m) == 2 and m.worker_for("m", "", "k1") == ""
    assert m.worker_for("m", "", "") == "" and m.worker_for("m", "", "k3") == "w1"
