"""A disk checkpoint is loaded from one read of its payload, checksummed from the
very bytes that are loaded (issue 15 item 2), in process, on a small random-weight
llama (tests/support/tiny_models.py) with a real store in a temporary directory.

Reads are counted where they happen: every `open` of a payload file is replaced by
a file object that counts the bytes its `readinto` returns (the store's separate
checksum pass used one too, so a second pass would show up as twice the size).
"""

from __future__ import annotations

import builtins
import io
import random
from collections import Counter

import pytest

N_TOKENS = 200
MODEL_ID = "tiny-llama"


@pytest.fixture(scope="module")
def bundle(tiny_model):
    from kvrouter.worker.models import load_model
    from tests.support.server import model_cache_dir

    return load_model(str(tiny_model("llama")), model_cache_dir())


def _state(bundle, n: int, seed: int):
    import mlx.core as mx

    r = random.Random(seed)
    tokens = [r.randrange(100, 40000) for _ in range(n)]
    state = bundle.state.new()
    mx.eval(bundle.model(mx.array(tokens)[None], cache=state))
    return tokens, state


def _arrays(caches) -> list:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [a for _, a in tree_flatten([c.state for c in caches]) if isinstance(a, mx.array)]


@pytest.fixture
def stored(bundle, tmp_path):
    """(store, manager, entry, saved state) after storing one checkpoint of N_TOKENS tokens."""
    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.worker import cache_state
    from kvrouter.worker.checkpoints import CheckpointManager

    store = CheckpointStore(StoreConfig(tmp_path / "kv", min_tokens=64))
    tokens, state = _state(bundle, N_TOKENS, 1)
    entry = store.save("waypoint", MODEL_ID, "ns", tokens, cache_state.payload_writer(state, N_TOKENS, MODEL_ID))
    assert entry is not None
    manager = CheckpointManager(MODEL_ID, bundle.state, store)
    yield store, manager, entry, state, tokens
    store.close()


@pytest.fixture
def payload_reads(monkeypatch, tmp_path):
    """Bytes read from payload files (under tmp_path/kv), by path, through any `open`."""
    counts: Counter = Counter()
    real_open = builtins.open

    class CountingFile(io.FileIO):
        def readinto(self, b):
            n = super().readinto(b)
            counts[self.name] += n or 0
            return n

    def counting_open(file, mode="r", buffering=-1, *args, **kwargs):
        path = str(file)
        if "rb" == mode.replace("t", "") and str(tmp_path / "kv") in path and path.endswith(".safetensors"):
            raw = CountingFile(path, "rb")
            return raw if buffering == 0 else io.BufferedReader(raw)
        return real_open(file, mode, buffering, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return counts


def test_a_disk_load_reads_the_payload_once_and_gives_the_saved_state(stored, payload_reads):
    import mlx.core as mx

    from kvrouter.worker import cache_state

    store, manager, entry, saved, _ = stored
    path = store.payload_dir / entry.payload_name
    restored = manager.load(entry, N_TOKENS)
    assert restored is not None and restored.source == "disk" and restored.n_tokens == N_TOKENS
    assert payload_reads == {str(path): path.stat().st_size}  # every byte once, nothing twice
    got, want = _arrays(restored.caches), _arrays(cache_state.cut(saved, N_TOKENS, N_TOKENS))
    assert len(got) == len(want) and all(a.dtype == b.dtype and mx.array_equal(a, b) for a, b in zip(got, want))
    st = restored.stages
    assert st is not None and st.bytes == path.stat().st_size
    assert st.read_s > 0 and st.device_s > 0 and st.build_s > 0 and st.total_s >= st.build_s
    assert st.resident is None or 0.0 <= st.resident <= 1.0
    assert store.get(entry.id).quarantined == ""


@pytest.mark.parametrize("where", ["first tensor byte", "middle", "last byte"])
def test_a_corrupted_byte_is_caught_by_the_one_read_and_quarantined(stored, payload_reads, where):
    from kvrouter.cachestore.payload_read import SequentialRead, read_header

    store, manager, entry, _, tokens = stored
    path = store.payload_dir / entry.payload_name
    size = path.stat().st_size
    read = SequentialRead(path)
    first = read_header(read).tensors[0].start
    read.cancel()
    pos = {"first tensor byte": first, "middle": (first + size) // 2, "last byte": size - 1}[where]
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01  # one bit: same size, different bytes
    path.write_bytes(bytes(data))
    payload_reads.clear()

    assert manager.load(entry, N_TOKENS) is None  # the caller falls back to prefill
    assert payload_reads[str(path)] == size  # caught by the load's own read, no second pass
    row = store.get(entry.id)
    assert row.quarantined.startswith("checksum_mismatch")
    assert not path.exists()
    assert store.lookup(MODEL_ID, "ns", tokens) is None  # never offered again (C11)
    assert manager.load(entry, N_TOKENS) is None


def test_a_load_cut_shorter_than_the_checkpoint_still_reads_it_once(stored, payload_reads):
    store, manager, entry, _, _ = stored
    restored = manager.load(entry, N_TOKENS - 50)
    assert restored is not None and restored.n_tokens == N_TOKENS - 50
    path = store.payload_dir / entry.payload_name
    assert payload_reads == {str(path): path.stat().st_size}


def test_the_warm_load_probe_runs_the_load_path_and_refuses_what_is_not_a_payload(bundle, tmp_path):
    """The warm probe turns a payload's first tensors into arrays as a load does and
    gives a rate; a file that is not a payload, or a missing one, gives None."""
    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.worker import cache_state
    from kvrouter.worker.checkpoint_load import probe_warm_load_bps
    from kvrouter.worker.checkpoints import CheckpointManager

    n = 3000  # ~3 MiB of KV on the tiny llama: past the probe's 1 MiB floor
    store = CheckpointStore(StoreConfig(tmp_path / "kv", min_tokens=64))
    tokens, state = _state(bundle, n, 2)
    entry = store.save("anchor", MODEL_ID, "ns", tokens, cache_state.payload_writer(state, n, MODEL_ID))
    path = store.payload_dir / entry.payload_name
    assert path.stat().st_size > (2 << 20)
    assert probe_warm_load_bps(path) > 0
    assert CheckpointManager(MODEL_ID, bundle.state, store).probe_warm_load() > 0  # the store's largest payload
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * (4 << 20))
    assert probe_warm_load_bps(junk) is None
    assert probe_warm_load_bps(tmp_path / "missing") is None


def test_a_payload_written_tensor_by_tensor_is_what_mlx_lm_saves_and_pauses_before_each(bundle, tmp_path):
    """The worker's payload writer (`worker.payload_write`) gives a file mlx-lm's
    `load_prompt_cache` reads back to the same arrays, classes and metadata as its own
    `save_prompt_cache`, and it calls pause() once before each tensor."""
    import mlx.core as mx
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    from kvrouter.worker import cache_state

    tokens, state = _state(bundle, 300, 3)
    calls = []
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    cache_state.payload_writer(state, 300, MODEL_ID, pause=lambda: calls.append(1))(ours)
    meta = {"format": "x", "model_id": MODEL_ID, "n_tokens": "300"}
    save_prompt_cache(str(theirs), state, metadata=meta)
    a, a_meta = load_prompt_cache(str(ours), return_metadata=True)
    b, _ = load_prompt_cache(str(theirs), return_metadata=True)
    assert [type(c).__name__ for c in a] == [type(c).__name__ for c in b]
    assert len(_arrays(a)) == len(_arrays(b)) and all(mx.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))
    assert a_meta["model_id"] == MODEL_ID and a_meta["n_tokens"] == "300"
    assert len(calls) == len(mx.load(str(ours)))


def test_a_warm_up_load_gives_way_when_asked_and_is_kept_in_the_ram_tier_otherwise(stored):
    """The RAM tier's warm-up (`CheckpointManager.warm`): asked to stop, the load is given
    up between tensors, the entry stays usable (not quarantined) and out of the RAM tier;
    not asked, it lands there holding the saved state."""
    import mlx.core as mx

    from kvrouter.worker.checkpoint_load import LoadInterrupted, load_state
    from kvrouter.worker.checkpoints import CheckpointManager
    from kvrouter.worker.ram_tier import RamTier

    store, first, entry, state, _tokens = stored
    manager = CheckpointManager(MODEL_ID, first.spec, store, ram=RamTier(1 << 30))
    with pytest.raises(LoadInterrupted):
        load_state(store.open_read(entry), MODEL_ID, N_TOKENS, manager.spec.layout, verify=lambda r: None,
                   should_stop=lambda: True)
    assert manager.warm_candidates(1 << 30) == [entry]
    assert manager.warm(entry, should_stop=lambda: True) is None
    assert entry.id not in manager.ram and [e.id for e in store.entries()] == [entry.id]  # not quarantined
    assert manager.warm(entry, should_stop=lambda: False) is not None
    assert manager.warm_candidates(1 << 30) == []  # held now
    held = manager.ram.get(entry.id)
    assert all(mx.array_equal(x, y) for x, y in zip(_arrays(held), _arrays(state)))
