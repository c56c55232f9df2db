"""`python -P -m kvrouter.worker.bench_prefill`'s command line (no model): the
GPU driver calls it as `--model DIR --through-engine --tokens 32768 --json FILE`."""

from __future__ import annotations

import pytest

from kvrouter.worker.bench_prefill import MODES, build_parser


def test_the_drivers_command_line_parses():
    args = build_parser().parse_args(["--model", "/m", "--through-engine", "--tokens", "8192,32768",
                                      "--repeat", "1", "--prefill-chunk-tokens", "2048", "--json", "out.json"])
    assert (args.model, args.through_engine, args.tokens, args.repeat) == ("/m", True, [8192, 32768], 1)
    assert args.prefill_chunk_tokens == 2048 and str(args.json) == "out.json"
    assert args.modes.split(",") == list(MODES) == ["plain", "worker", "worker_batch"]


def test_defaults_are_left_to_the_mode():
    args = build_parser().parse_args([])
    assert (args.model, args.tokens, args.repeat, args.through_engine, args.json) == (None, None, None, False, None)


@pytest.mark.parametrize("bad", ["", "abc", "512,x", "1"])
def test_bad_lengths_are_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--tokens", bad])
    assert e.value.code == 2
    assert "--tokens" in capsys.readouterr().err
