"""Key derivation: chained block hashes over token ids (store case C9: namespaces never collide).

A store key never contains raw strings next to each other. The root of a chain is

    c_0 = H(field("kvrouter-v1"), field("model"), field(model_id), field("ns"), field(namespace))

where ``field`` is a one-byte type tag plus a little-endian 8-byte length plus the UTF-8
bytes, so no choice of ``model_id`` / ``namespace`` strings can produce another pair's
input (the "x"+"nsy" vs "xns"+"y" trick of naive concatenation fails). Each 64-token block
extends the chain: ``c_{k+1} = H(b"B", c_k, block k as little-endian uint32)``. An entry of
``n = q*64 + r`` tokens is registered under node ``c_q`` with ``(r, H(b"T", c_q, tail))``.
H is xxh3_128 (16-byte digests). Hashes only find candidates; the store always confirms a
candidate by comparing exact token ids.
"""

from __future__ import annotations

import array
import sys

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import xxhash

BLOCK_TOKENS = 64
"""Tokens per chained block."""

KEY_VERSION = b"kvrouter-v1"
_TAG_STR = b"s"
_TAG_BYTES = b"b"
_TAG_BLOCK = b"B"
_TAG_TAIL = b"T"
_MAX_TOKEN = 2**32 - 1


def _field(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack("<Q", len(data)) + data


def root_key(model_id: str, namespace: str) -> bytes:
    """Chain root c_0 (16 bytes) for one model identity and one namespace.

    Raises TypeError when either is not a str.
    """
    if not isinstance(model_id, str) or not isinstance(namespace, str):
        raise TypeError("model_id and namespace must be str")
    h = xxhash.xxh3_128()
    h.update(_field(_TAG_BYTES, KEY_VERSION))
    h.update(_field(_TAG_STR, b"model"))
    h.update(_field(_TAG_STR, model_id.encode("utf-8", "surrogatepass")))
    h.update(_field(_TAG_STR, b"ns"))
    h.update(_field(_TAG_STR, namespace.encode("utf-8", "surrogatepass")))
    return h.digest()


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (4 bytes per token).

    Lists and tuples of ints take a fast path through `array.array` (about 0.2 ms
    for 32K tokens, a third of numpy's conversion). Raises ValueError for ids
    outside [0, 2**32 - 1] or non-integer input.
    """
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        raise ValueError("tokens must be a sequence of ints, not bytes")
    if isinstance(tokens, (list, tuple)):
        try:
            arr32 = array.array("I", tokens)
        except OverflowError as exc:
            raise ValueError("token ids must be in [0, 2**32 - 1]") from exc
        except TypeError as exc:
            raise ValueError("tokens must be a flat sequence of integer ids") from exc
        if arr32.itemsize == 4:
            if sys.byteorder != "little":
                arr32.byteswap()
            return arr32.tobytes()
    arr = np.asarray(tokens)
    if arr.size == 0:
        return b""
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError("tokens must be a flat sequence of integer ids")
    if int(arr.min()) < 0 or int(arr.max()) > _MAX_TOKEN:
        raise ValueError("token ids must be in [0, 2**32 - 1]")
    return arr.astype("<u4", copy=False).tobytes()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading token ids equal in both sequences (vectorised: about
    0.5 ms for two 32K-token prompts, where a Python loop takes 8 ms)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.frombuffer(pack_tokens(a[:n] if isinstance(a, (list, tuple)) else list(a[:n])), dtype="<u4")
    y = np.frombuffer(pack_tokens(b[:n] if isinstance(b, (list, tuple)) else list(b[:n])), dtype="<u4")
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def unpack_tokens(raw: bytes) -> list[int]:
    """Inverse of ``pack_tokens``."""
    return np.frombuffer(bytes(raw), dtype="<u4").tolist()


def next_node(parent: bytes, block: bytes) -> bytes:
    """c_{k+1} from c_k and the packed bytes of block k (BLOCK_TOKENS tokens)."""
    return xxhash.xxh3_128_digest(_TAG_BLOCK + parent + block)


def tail_hash(node: bytes, tail: bytes) -> bytes:
    """Hash of the packed tail (0..63 tokens) that follows node c_q."""
    return xxhash.xxh3_128_digest(_TAG_TAIL + node + tail)


def iter_nodes(root: bytes, packed: bytes) -> Iterator[bytes]:
    """Yield c_1, c_2, ... for every complete block in ``packed`` (lazily, so a walk can stop early)."""
    step = BLOCK_TOKENS * 4
    node = root
    for off in range(0, len(packed) - step + 1, step):
        node = next_node(node, packed[off : off + step])
        yield node


def path_nodes(root: bytes, packed: bytes) -> list[bytes]:
    """[c_0, c_1, ..., c_q] for a packed sequence of n = q*64 + r tokens."""
    return [root, *iter_nodes(root, packed)]


def split(n_tokens: int) -> tuple[int, int]:
    """(q, r) with n_tokens = q * BLOCK_TOKENS + r."""
    return divmod(n_tokens, BLOCK_TOKENS)


def search_registrations(chain: Sequence[bytes], deepest: int, packed: bytes,
                         regs_at: Callable[[int], Iterable[tuple[int, bytes, str]]],
                         confirm: Callable[[str, int], object]):
    """The longest registered entry whose tokens are a prefix of ``packed``.

    chain: the prompt's nodes c_0, c_1, ...; deepest: the index of the deepest one
    that exists in the store. An entry of n = q*64 + r tokens is registered under
    c_q as (r, tail hash, entry id); ``regs_at(k)`` gives the registrations under
    chain[k]. Nodes are searched from ``deepest`` back to the root, longest tail
    first; a registration whose tail hash matches is handed to ``confirm(entry id,
    n_tokens)``, which checks the exact tokens and returns the entry or None.
    Returns the first confirmed entry, or None.
    """
    n = len(packed) // 4
    step = BLOCK_TOKENS * 4
    for k in range(deepest, -1, -1):
        base = k * BLOCK_TOKENS
        fitting = sorted((reg for reg in regs_at(k) if base + reg[0] <= n), key=lambda reg: -reg[0])
        tails: dict[int, bytes] = {}
        for r, th, entry_id in fitting:
            if r not in tails:
                tails[r] = tail_hash(chain[k], packed[k * step : k * step + 4 * r])
            if tails[r] != th:
                continue
            entry = confirm(entry_id, base + r)
            if entry is not None:
                return entry
    return None
