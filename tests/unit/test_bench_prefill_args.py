"""Command lines of the long-prefill work (no model): `python -P -m
kvrouter.worker.bench_prefill` (the GPU driver calls it as `--model DIR
--through-engine --tokens 32768 --json FILE`) and `--long-prefill-tokens`."""

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


def test_long_prefill_tokens_reaches_a_spawned_worker():
    """`serve` passes --long-prefill-tokens to its workers (BatchingConfig.as_args),
    and the worker's command line parses it back."""
    from kvrouter.router.cli import batching_config
    from kvrouter.router.cli import build_parser as cli_parser
    from kvrouter.worker.config import DEFAULT_LONG_PREFILL_TOKENS, BatchingConfig

    assert batching_config(cli_parser().parse_args(["worker"])).long_prefill_tokens == DEFAULT_LONG_PREFILL_TOKENS
    for value in (0, 1024):
        config = BatchingConfig(4, 2, long_prefill_tokens=value)
        assert batching_config(cli_parser().parse_args(["worker", *config.as_args()])) == config
