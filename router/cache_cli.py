"""`kvrouter cache ...`: look at and tidy the checkpoint store by hand.

    kvrouter cache ls [--json]         kind, namespace, tokens, size, hits, last used, text
    kvrouter cache show ID             one entry in full
    kvrouter cache rm ID               forget one entry
    kvrouter cache rm --namespace N    forget every entry of one tenant
    kvrouter cache verify              checksums, orphans, rows without payloads, payloads of an
                                       older format (exit 1 on any)
    kvrouter cache gc                  repair what verify reports (rows without payloads, failed
                                       checksums, orphans, stale temp files, older-format payloads)

The store is shared with running workers (LMDB is multi-process safe), so
these commands are safe while `kvrouter serve` runs. `ls`, `show` and `verify`
open it read-only and change nothing (so `verify` reports damage exactly as it
finds it); `rm` and `gc` write, and `gc` repairs what `verify` reports
(a worker does the same at start).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from kvrouter.cachestore import CheckpointStore, Entry, StoreConfig
from kvrouter.worker.payload_format import FORMAT_TAG, read_format_tag


def add_parser(sub) -> None:
    """Registers `cache` and its subcommands on an argparse subparsers object."""
    cache = sub.add_parser("cache", help="inspect and tidy the KV checkpoint store",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    def with_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--kv-cache-dir", "--kv-disk-dir", default=None,
                       help="store directory (default: the 'kv' folder in the cache directory)")
        return p

    ls = with_dir(cache_sub.add_parser("ls", help="list checkpoints, most recently used first"))
    ls.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    ls.add_argument("--all", action="store_true", help="include quarantined entries")
    show = with_dir(cache_sub.add_parser("show", help="show one checkpoint"))
    show.add_argument("id")
    rm = with_dir(cache_sub.add_parser("rm", help="remove a checkpoint, or every checkpoint of a namespace"))
    target = rm.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--namespace", help="remove every entry of this namespace")
    with_dir(cache_sub.add_parser("verify", help="check every payload; exit status 1 on damage or an older format"))
    with_dir(cache_sub.add_parser("gc", help="repair: drop rows without payload, quarantine failed checksums, "
                                            "remove orphan payloads, stale temp files and older-format payloads"))


def _ago(ts: float) -> str:
    s = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def run(ns, store_dir) -> int:
    """Runs one `cache` action on the store at `store_dir`; returns the exit status."""
    if not store_dir.exists():
        print(f"no store at {store_dir}")
        return 0 if ns.cache_command in ("ls", "gc", "verify") else 1
    read_only = ns.cache_command in READ_ONLY_ACTIONS
    if read_only and not (store_dir / "index").is_dir():
        print(f"store {store_dir} has no index yet")
        return 0
    store = CheckpointStore(StoreConfig(directory=store_dir), read_only=read_only)
    try:
        return _ACTIONS[ns.cache_command](store, ns)
    finally:
        store.close()


def _ls(store: CheckpointStore, ns) -> int:
    entries = sorted(store.entries(include_quarantined=ns.all), key=lambda e: e.last_used, reverse=True)
    if ns.json:
        print(json.dumps([asdict(e) for e in entries], indent=1))
        return 0
    if not entries:
        print(f"store {store.directory} is empty")
        return 0
    print(f"{'ID':<12} {'KIND':<9} {'NAMESPACE':<14} {'TOKENS':>7} {'MIB':>8} {'HITS':>5}  {'LAST USED':<10} TEXT")
    for e in entries:
        text = e.text_preview.replace("\n", "\\n")[:40]
        flag = f" [quarantined: {e.quarantined}]" if e.quarantined else ""
        print(f"{e.id[:12]:<12} {e.kind:<9} {e.namespace[:14] or '-':<14} {e.n_tokens:>7} "
              f"{e.payload_bytes / 2**20:>8.1f} {e.hits:>5}  {_ago(e.last_used):<10} {text}{flag}")
    total = sum(e.payload_bytes for e in entries)
    print(f"{len(entries)} entries, {total / 2**20:.1f} MiB")
    return 0


def _resolve(store: CheckpointStore, prefix: str):
    matches = [e for e in store.entries(include_quarantined=True) if e.id.startswith(prefix)]
    if len(matches) != 1:
        print(f"{'no' if not matches else 'more than one'} entry matches {prefix!r}")
        return None
    return matches[0]


def _show(store: CheckpointStore, ns) -> int:
    entry = _resolve(store, ns.id)
    if entry is None:
        return 1
    print(json.dumps({**asdict(entry), "payload_path": str(store.payload_dir / entry.payload_name)}, indent=1))
    return 0


def _rm(store: CheckpointStore, ns) -> int:
    if ns.namespace is not None:
        n = store.remove_namespace(ns.namespace)
        print(f"removed {n} entries of namespace {ns.namespace!r}")
        return 0
    entry = _resolve(store, ns.id)
    if entry is None:
        return 1
    store.remove(entry.id)
    print(f"removed {entry.id}")
    return 0


def outdated(store: CheckpointStore) -> list[tuple[Entry, str | None]]:
    """(entry, its payload's format tag) of every usable entry whose payload is not of
    this kvrouter's format (`worker.payload_format`): workers never look them up (the
    format is part of the model identity), so they only take disk space. Entries whose
    payload is missing are left to `verify`'s other checks."""
    out = []
    for e in store.entries():
        try:
            tag = read_format_tag(store.payload_dir / e.payload_name)
        except OSError:
            continue
        if tag != FORMAT_TAG:
            out.append((e, tag))
    return out


def _verify(store: CheckpointStore, ns) -> int:
    problems = store.verify()
    problems += [f"{e.id}: payload format {tag or 'unknown'}, not {FORMAT_TAG}: never loaded "
                 f"(`kvrouter cache gc` removes it)" for e, tag in outdated(store)]
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {store.directory}")
    if problems:
        print("`kvrouter cache gc` repairs them: drops rows without payload, quarantines failed checksums, "
              "removes orphan and temp files")
    return 1 if problems else 0


def _gc(store: CheckpointStore, ns) -> int:
    removed = store.collect_garbage()
    old = sum(store.remove(e.id) for e, _ in outdated(store))
    print(f"removed {removed} orphan or temp file(s) and {old} entr{'y' if old == 1 else 'ies'} of an older "
          f"payload format")
    return 0


READ_ONLY_ACTIONS = ("ls", "show", "verify")
_ACTIONS = {"ls": _ls, "show": _show, "rm": _rm, "verify": _verify, "gc": _gc}
