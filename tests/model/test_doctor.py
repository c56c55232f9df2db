"""`kvrouter doctor` reports the store's state and what it would fix, without changing it."""

from __future__ import annotations

from kvrouter.cachestore import CheckpointStore, StoreConfig
from kvrouter.router.doctor import check_store, format_report, run_checks
from tests.support.server import model_cache_dir


def test_doctor_reports_store_size_and_damage_without_repairing(tmp_path):
    kv = tmp_path / "kv"
    assert "not created yet" in check_store(kv)[0].detail
    with CheckpointStore(StoreConfig(directory=kv)) as store:
        a = store.save("anchor", "m", "", list(range(600)), lambda p: p.write_bytes(b"a" * 3000))
        store.save("waypoint", "m", "", list(range(900)), lambda p: p.write_bytes(b"w" * 5000))
    (kv / "payloads" / a.payload_name).unlink()  # a row whose payload is gone
    checks = check_store(kv, budget_bytes=2**20)
    report = format_report(checks)
    assert "2 checkpoints" in checks[0].detail and "anchor 1" in checks[0].detail
    assert "1 rows have no payload file" in report and "fix:" in report
    with CheckpointStore(StoreConfig(directory=kv)) as store:  # doctor changed nothing; repair fixes it
        assert len(store.entries()) == 2
        store.repair()
        assert len(store.entries()) == 1


def test_doctor_command_checks_this_machine(capsys):
    from kvrouter.router.cli import main

    checks = run_checks(model_cache_dir(), model_cache_dir() / "no-such-kv")
    names = [c.name for c in checks]
    assert names[:4] == ["mlx", "mlx-lm", "blas", "default model"]
    assert main(["doctor", "--cache-dir", str(model_cache_dir())]) == 0
    out = capsys.readouterr().out
    assert "backend cpu" in out or "backend metal" in out or "backend cuda" in out
