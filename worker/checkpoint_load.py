"""Loading a checkpoint from its one read: the payload's bytes arrive in file order
from a `cachestore.payload_read.SequentialRead` (a thread reading large blocks and
hashing them), each tensor goes into an MLX array as soon as its bytes are there
(the read goes on meanwhile), the checksum is checked once the last byte is in,
and only then are mlx-lm's cache objects built from the arrays.

Arrays are made by `mx.load` itself, one tensor at a time, from a small file-like
view (`_TensorFile`: a safetensors header of our own for that tensor, then its
bytes taken from the read): MLX allocates the array where its backend wants it and
copies the bytes in (on CUDA through its own host-to-device copy), so a tensor's
bytes are copied once from the read's block. `mx.load` on a whole file object
would read tensors in the order of a hash map, not of the file (seen with MLX
0.32.4), which a hash over the file cannot follow; one tensor per call keeps file
order. On CUDA, tensors larger than `CUDA_PIECE_BYTES` are loaded in pieces and
joined on the device: MLX stages each host-to-device copy in a fresh host buffer,
and buffers past glibc's mmap threshold (32 MiB at most) come back as new pages
each time.

Building follows the layout mlx-lm's `save_prompt_cache` writes (read in
`mlx_lm/models/cache.py`): metadata `[our metadata, class names, scalars]`
flattened; arrays named by their place in `[c.state for c in caches]`; scalars
saved as arrays and marked "scalar"/"string"/"none"; each layer rebuilt with its
class's `from_state`. Classes are looked up in `mlx_lm.models.cache` by name.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache

from kvrouter.cachestore.payload_read import PayloadReadError, SequentialRead, TensorSpan, read_header
from kvrouter.worker.cache_state import CheckpointFormatError, check_tokens, describe_layout
from kvrouter.worker.payload_format import FORMAT_TAG

CUDA_PIECE_BYTES = 16 << 20
"""On CUDA, tensors are moved to the device in pieces of at most this many bytes (see the
module docstring); elsewhere whole."""


@dataclass(frozen=True)
class LoadStages:
    """Where a checkpoint load's time went, seconds (bytes in bytes).

    read_s: the reading thread's time from the first block to the last, hashing
    included (it may have started before the request was admitted: a prefetch);
    device_s: the engine thread's time turning bytes into arrays on the device,
    waits for the disk excluded; build_s: the mlx-lm cache objects and checks;
    wait_s: the engine thread's time waiting for bytes; total_s: the engine thread's
    time in the load, what the request waited for it. resident: fraction of the file
    the page cache held when its read began (None: unknown). cost_s:
    `max(read_s, device_s) + build_s` (the two overlap), what the load's own work
    took, whether or not its read started early (a prefetch).
    """

    bytes: int
    read_s: float
    device_s: float
    build_s: float
    wait_s: float
    total_s: float
    resident: float | None

    @property
    def cost_s(self) -> float:
        return max(self.read_s, self.device_s) + self.build_s


class _TensorFile(io.RawIOBase):
    """A file object `mx.load` reads one tensor from: a safetensors header made here
    for that tensor, then `nbytes` bytes taken from `read` in order."""

    def __init__(self, read: SequentialRead, dtype: str, shape: tuple[int, ...], nbytes: int):
        super().__init__()
        head = json.dumps({"t": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
        self._head = struct.pack("<Q", len(head)) + head
        self._size = len(self._head) + nbytes
        self._pos = 0
        self._taken = 0  # data bytes taken from the read
        self._read = read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        head = len(self._head)
        if self._pos < head:
            n = min(len(out), head - self._pos)
            out[:n] = self._head[self._pos: self._pos + n]
            self._pos += n
            return n
        if self._pos - head != self._taken:  # the read goes one way only
            raise PayloadReadError(f"mx.load asked for tensor bytes out of order ({self._pos - head} != {self._taken})")
        n = min(len(out), self._size - self._pos)
        self._read.readinto(out[:n])
        self._pos += n
        self._taken += n
        return n


def _pieces(span: TensorSpan, piece_bytes: int) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes) of the pieces `span` is loaded in, in order: split along its first
    axis longer than 1, each piece at most `piece_bytes` where rows allow (one piece
    when it fits, or when piece_bytes is 0)."""
    shape, nbytes = span.shape, span.nbytes
    if not piece_bytes or nbytes <= piece_bytes:
        return [(shape, nbytes)]
    axis = next((i for i, d in enumerate(shape) if d > 1), None)
    if axis is None:
        return [(shape, nbytes)]
    rows = 1
    for d in shape[: axis + 1]:
        rows *= d
    row_bytes = nbytes // rows
    step = max(1, piece_bytes // row_bytes)
    tail = shape[axis + 1:]
    return [((min(step, rows - r), *tail), min(step, rows - r) * row_bytes) for r in range(0, rows, step)]


def _load_tensor(read: SequentialRead, span: TensorSpan, piece_bytes: int) -> mx.array:
    """The next tensor of `read` as an evaluated array on the default device."""
    parts = []
    for shape, nbytes in _pieces(span, piece_bytes):
        with _TensorFile(read, span.dtype, shape, nbytes) as f:
            parts.append(mx.load(f, format="safetensors")["t"])
    if len(parts) == 1:
        return parts[0]
    joined = mx.concatenate(parts, axis=0).reshape(span.shape)
    mx.eval(joined)
    return joined


def _scalar(array: mx.array, kind: str):
    if kind == "scalar":
        return array.item()
    if kind == "string":
        return "".join(chr(c) for c in array.tolist())
    if kind == "none":
        return None
    raise CheckpointFormatError(f"unknown scalar kind {kind!r}")


def _cache_class(name: str):
    cls = getattr(mlx_cache, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_state"):
        raise CheckpointFormatError(f"{name!r} is not an mlx-lm cache class")
    return cls


def build_caches(arrays: dict, metadata: dict) -> tuple[list, dict]:
    """mlx-lm cache objects from a payload's arrays (name -> mx.array) and its safetensors
    metadata, as `save_prompt_cache` laid them out (see the module docstring). Returns
    (caches, our metadata). Raises CheckpointFormatError when the layout is not that."""
    try:
        ours, classes, scalars = tree_unflatten(list(metadata.items()))
        for pos, kind in scalars[1:]:
            arrays[pos] = _scalar(arrays[pos], kind)
        states = tree_unflatten(list(arrays.items())) if arrays else []
        if len(states) != len(classes):
            raise ValueError(f"{len(states)} layer states for {len(classes)} cache classes")
        caches = [_cache_class(c).from_state(s) for c, s in zip(classes, states)]
    except CheckpointFormatError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointFormatError(f"not a state mlx-lm saved: {exc}") from exc
    return caches, dict(ours) if isinstance(ours, dict) else {}


def piece_bytes_for_device() -> int:
    """`CUDA_PIECE_BYTES` on CUDA, else 0 (whole tensors)."""
    try:
        return CUDA_PIECE_BYTES if mx.default_device() == mx.gpu and mx.cuda.is_available() else 0
    except AttributeError:  # an MLX without mx.cuda
        return 0


class LoadInterrupted(Exception):
    """A load given up between tensors because its caller asked (`load_state`'s
    should_stop): nothing is wrong with the payload."""


def _read_tensors(read: SequentialRead, header, pieces: int, should_stop: Callable[[], bool] | None = None):
    """Yields (TensorSpan, evaluated array on the default device) for `header`'s tensors
    in file order, from `read`. Raises LoadInterrupted when `should_stop()` is true
    before a tensor."""
    for n, span in enumerate(header.tensors):
        if should_stop is not None and should_stop():
            raise LoadInterrupted(f"{read.path}: load given up after {n} tensors")
        if span.start > read.consumed:
            read.skip(span.start - read.consumed)
        yield span, _load_tensor(read, span, pieces)


def load_state(read: SequentialRead, model_id: str, n_tokens: int, layout: str,
               verify: Callable[[SequentialRead], None], piece_bytes: int | None = None,
               should_stop: Callable[[], bool] | None = None) -> tuple[list, LoadStages]:
    """The state a checkpoint payload holds, from its one read, with where the time went.

    verify: called once every byte is in (before any cache object is built), e.g.
    `CheckpointStore.finish_read`, which compares the checksum; what it raises
    propagates. model_id / n_tokens / layout: what the payload must hold (its
    metadata and `cache_state.describe_layout`). piece_bytes: see `_pieces` (None: by
    device). should_stop: asked before each tensor; True gives the load up (the RAM
    tier's warm-up yields to a request that way). Returns (caches, LoadStages); arrays
    are evaluated. Raises CheckpointFormatError for a payload that is not such a state,
    PayloadReadError when the read fails, LoadInterrupted when should_stop said so; the
    read is cancelled on any error."""
    t0 = time.perf_counter()
    wait0 = read.wait_seconds
    pieces = piece_bytes_for_device() if piece_bytes is None else piece_bytes
    try:
        header = read_header(read)
        arrays = {span.name: a for span, a in _read_tensors(read, header, pieces, should_stop)}
        verify(read)
    except BaseException:
        read.cancel()
        raise
    t1 = time.perf_counter()
    caches, ours = build_caches(arrays, header.metadata)
    name = read.path.rsplit("/", 1)[-1]
    if ours.get("format") != FORMAT_TAG:
        raise CheckpointFormatError(f"{name}: format {ours.get('format')!r}, expected {FORMAT_TAG}")
    if ours.get("model_id") != model_id:
        raise CheckpointFormatError(f"{name}: written for another model identity")
    if ours.get("n_tokens") != str(n_tokens):
        raise CheckpointFormatError(f"{name}: holds {ours.get('n_tokens')} tokens, index says {n_tokens}")
    if describe_layout(caches) != layout:
        raise CheckpointFormatError(f"{name}: layout {describe_layout(caches)}, expected {layout}")
    check_tokens(caches, n_tokens, name)
    mx.eval([a for _, a in tree_flatten([c.state for c in caches]) if isinstance(a, mx.array)])
    t2 = time.perf_counter()
    wait = read.wait_seconds - wait0
    return caches, LoadStages(read.size, read.read_seconds, max(0.0, t1 - t0 - wait), t2 - t1, wait, t2 - t0,
                              read.resident)


WARM_PROBE_BYTES = 64 << 20
"""How much of a payload the warm-load probe (`probe_warm_load_bps`) turns into arrays,
bytes: enough for several CUDA pieces, a few milliseconds on a GPU."""


def probe_warm_load_bps(path, max_bytes: int = WARM_PROBE_BYTES) -> float | None:
    """Bandwidth of a load whose payload the page cache holds, bytes per second: the
    first tensors of `path` (up to about `max_bytes`, whole tensors or CUDA pieces) go
    through the same path as a real load (`SequentialRead`, `mx.load` per tensor, the
    host-to-device copy) after a plain read has put those bytes in the page cache. The
    arrays are dropped. None when the file cannot be read, is not a payload, or holds
    under 1 MiB of tensors.

    Why: a read probe alone (`cachestore.payload_read.probe_cold_read_bps`) leaves out
    the copy to the device, which on CUDA sets the pace of a warm load (MLX copied host
    data at ~2.2 GB/s on the H200, the page cache read at ~8 GB/s). Without a warm
    figure a worker whose payloads sit in the page cache (after a restart) priced every
    load at the cold rate and recomputed where loading was as fast, and it never learnt
    otherwise (only a load measures a load)."""
    try:
        with open(path, "rb", buffering=0) as f:  # the bytes probed go into the page cache first
            left = max_bytes + (1 << 20)
            while left > 0:
                chunk = f.read(min(left, 8 << 20))
                if not chunk:
                    break
                left -= len(chunk)
        read = SequentialRead(path)
    except OSError:
        return None
    pieces = piece_bytes_for_device()
    arrays, got = [], 0
    try:
        t0 = time.perf_counter()
        for span, a in _read_tensors(read, read_header(read), pieces):
            arrays.append(a)
            got += span.nbytes
            if got >= max_bytes:
                break
        mx.eval(arrays)
        seconds = time.perf_counter() - t0
    except (PayloadReadError, OSError, ValueError, RuntimeError):
        return None
    finally:
        read.cancel()
        del arrays
    return got / seconds if got >= (1 << 20) and seconds > 0 else None


def load_payload(path, model_id: str, n_tokens: int, layout: str) -> list:
    """Reads a checkpoint file written by `cache_state.payload_writer`, evaluated, without
    an index row to check its checksum against (benchmarks, tests, diagnosis; a worker's
    load goes through the store: `CheckpointManager.load`, `load_state` with the store's
    `finish_read`).

    layout: `cache_state.describe_layout` of the worker's own state; the file must match
    it. Raises CheckpointFormatError for an unreadable file, another format, model
    identity, token count or layout (the file is then useless and should be quarantined)."""
    try:
        return load_state(SequentialRead(path), model_id, n_tokens, layout, verify=lambda r: r.finish())[0]
    except (OSError, PayloadReadError) as exc:
        raise CheckpointFormatError(f"cannot read checkpoint {os.path.basename(os.fspath(path))}: {exc}") from exc
