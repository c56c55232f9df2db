"""Typed aiohttp application keys (instead of globals)."""

from __future__ import annotations

from aiohttp import web

from kvrouter.router.config import RouterConfig
from kvrouter.router.dispatch import Dispatcher
from kvrouter.router.metrics import RouterMetrics
from kvrouter.router.pool import WorkerPool

ROUTER_CONFIG = web.AppKey("router_config", RouterConfig)
POOL = web.AppKey("pool", WorkerPool)
METRICS = web.AppKey("metrics", RouterMetrics)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
