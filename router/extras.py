"""Optional parts of kvrouter and the pip extra each one needs.

A plain `pip install kvrouter` carries only what serving needs; the benchmarks
(`kvrouter bench`) and SMG's worker protocol (`kvrouter worker --smg-listen`)
need extras. Commands check up front, so a missing extra is one clear line
instead of an ImportError deep inside a run.
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "bench": ("openai", "matplotlib"),  # kvrouter bench: its HTTP client and its plots
    "smg": ("smg_grpc_proto",),  # kvrouter worker --smg-listen: SMG's generated gRPC code
}


class MissingExtra(RuntimeError):
    """A command needs modules of a pip extra that is not installed."""


def require_extra(name: str, what: str) -> None:
    """Raises MissingExtra (naming the extra and the missing modules) unless every
    module of extra `name` can be imported; `what` names the command that needs it."""
    missing = [m for m in EXTRAS[name] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{what} needs the '{name}' extra: pip install 'kvrouter[{name}]' "
                           f"(missing: {', '.join(missing)})")
