"""A disk load's stages travel in the worker's Final (worker.proto Usage) and become
`kvrouter_checkpoint_load_seconds{stage}` on the router. No model, no process."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvrouter_proto import worker_pb2

from kvrouter.cachestore.costs import Rates
from kvrouter.router.metrics import create_metrics, record_completion
from kvrouter.router.worker_client import completion_from_proto, rates_from_proto
from kvrouter.worker.servicer import rates_message


def sums(m) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        if fam.name == "kvrouter_checkpoint_load_seconds":
            for s in fam.samples:
                if s.name.endswith("_sum"):
                    out[s.labels["stage"]] = s.value
    return out


def test_a_disk_load_is_recorded_by_stage():
    final = worker_pb2.Final(finish_reason="stop", usage=worker_pb2.Usage(
        prompt_tokens=300, completion_tokens=2, cached_tokens=256, cache_source=worker_pb2.CACHE_SOURCE_DISK,
        load_seconds=0.5, loaded_bytes=1 << 20, load_read_seconds=0.4, load_device_seconds=0.3,
        load_build_seconds=0.05))
    c = completion_from_proto(final)
    assert c.load_stages == (0.4, 0.3, 0.05)
    m = create_metrics()
    record_completion(m, "m", c, loaded_bytes=1 << 20)
    assert sums(m) == {"total": 0.5, "read": 0.4, "device": 0.3, "build": 0.05}


def test_the_fitted_rates_cross_the_wire_intact():
    r = Rates(prefill_tps=300, disk_bps=2e9, ram_bps=1e10, decode_tps=20, prefill_fixed_s=0.01,
              prefill_linear_s=1e-3, prefill_quad_s=2e-7, disk_cold_bps=1e9, disk_warm_bps=5e9)
    assert rates_from_proto(rates_message(r)) == r
