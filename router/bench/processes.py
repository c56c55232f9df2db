"""What the memory and soak benchmarks read from a running `kvrouter serve`: its
workers (name, pid) from GET /v1/router/state, and their resident memory (psutil)."""

from __future__ import annotations

import json
import urllib.request


def router_state(base_url: str) -> dict:
    """GET /v1/router/state (a server without --api-keys-file shows every worker's pid)."""
    with urllib.request.urlopen(base_url + "/v1/router/state", timeout=30) as resp:
        return json.load(resp)


def worker_pids(base_url: str) -> dict[str, int]:
    """Worker name -> pid of the local workers."""
    return {w["name"]: w["pid"] for w in router_state(base_url)["workers"] if w.get("pid")}


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, bytes (None when it is gone)."""
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
