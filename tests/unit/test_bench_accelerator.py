"""The GPU measurement driver's command line and report shape (no model, no process):
`python -P -m kvrouter.router.bench.accelerator`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrouter.router.bench import accelerator as acc


def args(*extra: str) -> list[str]:
    return ["--model", "/models/m8b", "--out", "/tmp/r.json", *extra]


def test_defaults_are_the_issue_lengths_and_one_device_call():
    cfg = acc.parse_args(args())
    assert cfg.model == Path("/models/m8b")
    assert cfg.lengths == (8192, 32768)
    assert cfg.budget_s == 540.0
    assert cfg.parts == acc.PARTS == ("cold", "hits", "compare", "prefill", "load_or_recompute", "hits_inproc")
    assert cfg.mlx_server is False
    assert cfg.work_dir is None


def test_lengths_sorted_without_repeats_and_parts_in_priority_order():
    cfg = acc.parse_args(args("--lengths", "1024,512,1024", "--parts", "prefill,cold", "--mlx-server",
                              "--budget-s", "300"))
    assert cfg.lengths == (512, 1024)
    assert cfg.parts == ("cold", "prefill")
    assert cfg.mlx_server is True
    assert cfg.budget_s == 300.0


@pytest.mark.parametrize("flags, message", [
    (["--lengths", "8k"], "integers"),
    (["--lengths", "100,8192"], "at least 256"),
    (["--lengths", ","], "at least 256"),
    (["--parts", "cold,warm"], "unknown part(s) warm"),
    (["--budget-s", "0"], "must be positive"),
    (["--budget-s", "-5"], "must be positive"),
])
def test_bad_flags_exit_2_with_the_reason(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        acc.parse_args(args(*flags))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_model_and_out_are_required(capsys):
    with pytest.raises(SystemExit):
        acc.parse_args(["--out", "r.json"])
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        acc.parse_args(["--model", "m"])
    assert "--out" in capsys.readouterr().err


def test_help_explains_every_flag():
    text = acc.build_parser().format_help()
    for flag in ("--model", "--out", "--mlx-server", "--lengths", "--budget-s", "--parts", "--cache-dir",
                 "--work-dir"):
        assert flag in text


def test_a_directory_without_config_json_is_refused_before_any_server(tmp_path, capsys):
    assert acc.main(["--model", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    assert "not an mlx-lm model directory" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_report_skeleton_is_json_with_every_part_unmeasured():
    cfg = acc.parse_args(args("--lengths", "512,1024"))
    report = acc.new_report(cfg)
    assert json.loads(json.dumps(report)) == report
    assert report["parts"] == {p: None for p in acc.PARTS}
    assert report["config"]["lengths"] == [512, 1024]
    assert report["config"]["model"] == "/models/m8b"
    assert report["skipped"] == {} and report["notes"] == [] and report["summary"] == {}
    acc.skip(report, "prefill", "not available")
    assert report["skipped"] == {"prefill": "not available"}


def test_bounds_and_ratios():
    # 2 GB at 1 GB/s + 0.5 s of suffix prefill
    assert acc.disk_hit_bound_s(2e9, 1e9, 0.5) == pytest.approx(2.5)
    # live hit 0.3 s + 4 GB at 40 GB/s
    assert acc.ram_hit_bound_s(0.3, 4e9, 40e9) == pytest.approx(0.4)
    assert acc.ratio(3.0, 2.0) == 1.5
    assert acc.ratio(None, 2.0) is None and acc.ratio(1.0, None) is None and acc.ratio(1.0, 0.0) is None


def test_message_is_500_tokens_or_a_quarter_of_short_prompts():
    assert acc.message_tokens(8192) == 500
    assert acc.message_tokens(32768) == 500
    assert acc.message_tokens(512) == 128


def test_metric_delta_keeps_what_changed():
    before = {"a{}": 1.0, "b{source=disk}": 5.0}
    after = {"a{}": 1.0, "b{source=disk}": 7.5, "c{}": 2.0}
    assert acc.metric_delta(before, after) == {"b{source=disk}": 2.5, "c{}": 2.0}
    assert acc.pick({"x{kind=anchor}": 1.5, "x{kind=evict}": 0.5, "y{}": 9.0}, "x{") == 2.0


def test_summary_collects_each_parts_headline_ratio():
    report = acc.new_report(acc.parse_args(args("--lengths", "8192")))
    report["parts"]["cold"] = {"lengths": {"8192": {"store_vs_no_kv_cache": 1.02}}}
    report["parts"]["hits"] = {"lengths": {"8192": {"disk_vs_bound": 1.1, "ram_vs_bound": 1.3,
                                                    "load_or_recompute": {"took_vs_faster": 1.0}}}}
    report["parts"]["compare"] = {"ratios": {"kvrouter": {"ttft_p50": 0.4}}}
    report["parts"]["prefill"] = {"result": {"lengths": [{"tokens": 8192, "worker_vs_plain": 1.05}]}}
    report["parts"]["load_or_recompute"] = {"result": {"rows": [{"tokens": 8192, "page_cache": "cold", "ok": True},
                                                                {"tokens": 8192, "page_cache": "warm", "ok": False}]}}
    report["parts"]["hits_inproc"] = {"result": {"rows": [{"tokens": 8192, "disk_vs_bound": 1.15,
                                                           "ram_vs_bound": 0.98}]}}
    s = acc.summarize(report)
    assert s["cold_store_vs_no_kv_cache"] == {"8192": 1.02}
    assert s["disk_hit_vs_bound"] == {"8192": 1.1}
    assert s["ram_hit_vs_bound"] == {"8192": 1.3}
    assert s["load_or_recompute_took_vs_faster"] == {"8192": 1.0}
    assert s["compare_vs_mlx_lm_server"] == {"kvrouter": {"ttft_p50": 0.4}}
    assert s["prefill_worker_vs_plain"] == {"8192": 1.05}
    assert s["load_or_recompute_bench_ok"] == {"8192 cold": True, "8192 warm": False}
    assert s["inproc_disk_hit_vs_bound"] == {"8192": 1.15} and s["inproc_ram_hit_vs_bound"] == {"8192": 0.98}
    # an unmeasured report summarises to empty figures, never an error
    empty = acc.summarize(acc.new_report(acc.parse_args(args())))
    assert empty["disk_hit_vs_bound"] == {} and empty["compare_vs_mlx_lm_server"] is None


LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "torch_dtype": "bfloat16"}


def test_kv_bytes_per_token_of_the_8b_shape_is_the_issues_131kb():
    assert acc.kv_bytes_per_token(LLAMA_8B) == 131_072
    no_head_dim = {k: v for k, v in LLAMA_8B.items() if k != "head_dim"}
    assert acc.kv_bytes_per_token({**no_head_dim, "torch_dtype": "float32"}) == 262_144
    with pytest.raises(KeyError):
        acc.kv_bytes_per_token({"hidden_size": 4096})


def flag(flags: list[str], name: str) -> str:
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


def test_store_flags_hold_the_32k_states_of_an_8b_model():
    flags = acc.sized_store_flags((8192, 32768), 131_072)
    # 1.25 x 40,960 tokens x 128 KiB = 6,400 MiB
    assert flag(flags, "--live-state-mb") == "6400"
    assert flag(flags, "--kv-cache-ram-mb") == "6400"
    assert flag(flags, "--kv-cache-disk-mb") == "19200"
    assert flag(flags, "--kv-cache-cold-max-tokens") == "32768"
    assert flag(flags, "--kv-cache-min-tokens") == "512"


def test_store_flags_at_cpu_test_lengths_keep_the_defaults_floor():
    flags = acc.sized_store_flags((512, 1024), 2048)
    assert flag(flags, "--live-state-mb") == "256"
    assert flag(flags, "--kv-cache-disk-mb") == "4096"
    assert flag(flags, "--kv-cache-cold-max-tokens") == "30000"
    assert flag(flags, "--kv-cache-min-tokens") == "352"  # a 384-token prefix is still stored


def test_load_or_recompute_compares_only_what_was_measured():
    loaded = acc.load_or_recompute_row({"source": "disk", "ttft": 2.0}, 1.0)
    assert loaded["router_took"] == "load" and loaded["faster"] == "recompute" and loaded["took_vs_faster"] == 2.0
    fast = acc.load_or_recompute_row({"source": "disk", "ttft": 1.0}, 4.0)
    assert fast["faster"] == "load" and fast["took_vs_faster"] == 1.0
    recomputed = acc.load_or_recompute_row({"source": "computed", "ttft": 3.0}, 2.9)
    assert recomputed["router_took"] == "recompute"
    assert recomputed["faster"] is None and recomputed["took_vs_faster"] is None
