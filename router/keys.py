"""Typed aiohttp application keys (instead of globals)."""

from __future__ import annotations

from aiohttp import web

from kvrouter.router.cluster import Cluster
from kvrouter.router.config import RouterConfig
from kvrouter.router.dispatch import Dispatcher
from kvrouter.router.leases import Leases
from kvrouter.router.metrics import RouterMetrics

ROUTER_CONFIG = web.AppKey("router_config", RouterConfig)
CLUSTER = web.AppKey("cluster", Cluster)
LEASES = web.AppKey("leases", Leases)
METRICS = web.AppKey("metrics", RouterMetrics)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
