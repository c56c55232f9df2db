"""GET /v1/router/state: the workers as the router sees them (JSON).

Per worker: model, address, local or remote, pid (local ones), health, load
(`router.leases`: in flight, queued seconds, prefill backlog; its batch slots and
queue limit), measured rates and a cache summary (live states, RAM tier, store id,
cache event sequence, resyncs); and the local store's size.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from kvrouter.router.cluster import Cluster
from kvrouter.router.keys import CLUSTER, LEASES
from kvrouter.router.leases import Leases


def store_summary(cluster: Cluster) -> dict | None:
    """Entries, payload bytes and tokens of the local store (a scan of its index), or None."""
    store = cluster.store
    if store is None:
        return None
    try:
        entries = store.entries()
    except Exception as exc:
        return {"id": cluster.local_store_id, "error": str(exc)}
    return {"id": cluster.local_store_id, "entries": len(entries), "bytes": sum(e.payload_bytes for e in entries),
            "tokens": sum(e.n_tokens for e in entries)}


def worker_state(cluster: Cluster, leases: Leases, model_name: str, w) -> dict:
    v, load = cluster.view(w.name), leases.load(w.name)
    local = getattr(w, "local", True)
    return {
        "name": w.name,
        "address": w.address,
        "model": model_name,
        "local": local,
        "pid": v.pid if local and v.pid else None,
        "healthy": w.healthy,
        "load": {"in_flight": load.in_flight, "queued_seconds": round(load.queued_s, 3), "slots": v.slots,
                 "prompt_slots": v.prompt_slots, "prefill_backlog_seconds": round(load.prefill_backlog_s, 3),
                 "max_queue": cluster.queue_limit(v)},
        "rates": {"prefill_tokens_per_second": round(v.rates.prefill_tps, 1),
                  "disk_load_bytes_per_second": round(v.rates.disk_bps),
                  "ram_load_bytes_per_second": round(v.rates.ram_bps),
                  "decode_tokens_per_second": round(v.rates.decode_tps, 1)},
        "cache": {"live_states": [{"tokens": len(t), "namespace": ns} for ns, t in v.lives.values()],
                  "live_tokens": sum(len(t) for _, t in v.lives.values()),
                  "ram_entries": len(v.ram_ids), "ram_bytes": v.ram_bytes, "store_id": v.store_id,
                  "event_seq": v.event_seq, "resyncs": v.resyncs},
    }


def router_state(cluster: Cluster, leases: Leases, store: dict | None = None) -> dict:
    """The JSON body of GET /v1/router/state (`store`: a `store_summary`, computed apart
    because it scans the index)."""
    workers = [worker_state(cluster, leases, model.name, w) for model in cluster.models.values()
               for w in model.workers]
    return {"time": time.time(), "models": sorted(cluster.models), "workers": workers, "store": store}


async def router_state_view(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER]
    store = await asyncio.to_thread(store_summary, cluster)  # a scan: off the event loop
    return web.json_response(router_state(cluster, request.app[LEASES], store))
