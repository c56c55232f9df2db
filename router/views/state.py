"""GET /v1/router/state: the workers as the router sees them (JSON).

Per worker: model, address, local or remote, pid (local ones), health, load
(`router.leases`: in flight, queued seconds, prefill backlog; its batch slots and
queue limit), measured rates and a cache summary (live states, RAM tier, store id,
cache event sequence, resyncs); and the local store's size.

With `--api-keys-file` a key sees the workers' health, load and rates and only its
own namespaces' live states, without pids, addresses or the store's size; the whole
view needs a key named in `--admin-keys`. Without keys there are no tenants and the
whole view is served.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from kvrouter.router.auth import namespace_owner
from kvrouter.router.cluster import Cluster
from kvrouter.router.keys import CLUSTER, LEASES, ROUTER_CONFIG
from kvrouter.router.leases import Leases
from kvrouter.router.views.common import KEY_NAME_KEY


def store_summary(cluster: Cluster) -> dict | None:
    """Entries, payload bytes and tokens of the local store (the index's counters, no
    scan; see `CheckpointStore.stats`), or None without a store."""
    store = cluster.store
    if store is None:
        return None
    try:
        stats = store.stats()
    except Exception as exc:
        return {"id": cluster.local_store_id, "error": str(exc)}
    return {"id": cluster.local_store_id, "entries": stats.total_entries, "bytes": stats.total_bytes,
            "tokens": stats.total_tokens}


ALL = object()  # `tenant` of the whole view


def worker_state(cluster: Cluster, leases: Leases, model_name: str, w, tenant=ALL) -> dict:
    """One worker's entry; `tenant`: a key name whose namespaces alone are shown (ALL: every one)."""
    v, load = cluster.view(w.name), leases.load(w.name)
    local = getattr(w, "local", True)
    whole = tenant is ALL
    lives = [(ns, t) for ns, t in v.lives.values() if whole or namespace_owner(ns) == tenant]
    return {
        "name": w.name,
        "address": w.address if whole else None,
        "model": model_name,
        "local": local,
        "pid": v.pid if whole and local and v.pid else None,
        "healthy": cluster.serving(w),
        "stalled": v.stalled,
        "load": {"in_flight": load.in_flight, "queued_seconds": round(load.queued_s, 3), "slots": v.slots,
                 "prompt_slots": v.prompt_slots, "prefill_backlog_seconds": round(load.prefill_backlog_s, 3),
                 "max_queue": cluster.queue_limit(v)},
        "rates": {"prefill_tokens_per_second": round(v.rates.prefill_tps, 1),
                  "disk_load_bytes_per_second": round(v.rates.disk_bps),
                  "ram_load_bytes_per_second": round(v.rates.ram_bps),
                  "decode_tokens_per_second": round(v.rates.decode_tps, 1)},
        "cache": {"live_states": [{"tokens": len(t), "namespace": ns} for ns, t in lives],
                  "live_tokens": sum(len(t) for _, t in lives),
                  "ram_entries": len(v.ram_ids), "ram_bytes": v.ram_bytes, "store_id": v.store_id,
                  "event_seq": v.event_seq, "resyncs": v.resyncs},
    }


def router_state(cluster: Cluster, leases: Leases, store: dict | None = None, tenant=ALL) -> dict:
    """The JSON body of GET /v1/router/state (`store`: a `store_summary`, computed apart
    because it reads the index; `tenant`: see `worker_state`)."""
    workers = [worker_state(cluster, leases, model.name, w, tenant) for model in cluster.models.values()
               for w in model.workers]
    return {"time": time.time(), "models": sorted(cluster.models), "workers": workers,
            "store": store if tenant is ALL else None, "view": "all" if tenant is ALL else "own namespaces"}


async def router_state_view(request: web.Request) -> web.Response:
    cluster, config = request.app[CLUSTER], request.app[ROUTER_CONFIG]
    name = request.get(KEY_NAME_KEY)
    tenant = ALL if config.api_keys is None or name in config.admin_keys else name
    store = await asyncio.to_thread(store_summary, cluster) if tenant is ALL else None  # LMDB reads: off the loop
    return web.json_response(router_state(cluster, request.app[LEASES], store, tenant))
