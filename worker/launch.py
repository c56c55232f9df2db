"""How kvrouter starts its own Python processes (workers, the BLAS re-exec, benches).

Always `python -P -m MODULE`: `-P` (Python >= 3.11) keeps the launch directory off
`sys.path`, so a `router/` folder or a stray `h2.py` in the directory a user runs
`kvrouter serve` from can never shadow kvrouter's own packages or its dependencies.
"""

from __future__ import annotations

import sys

CLI_MODULE = "kvrouter.router.cli"


def module_command(module: str = CLI_MODULE, python: str | None = None) -> list[str]:
    """The argv prefix that runs `module` with `python` (default: this interpreter),
    without the current directory on `sys.path`."""
    return [python or sys.executable, "-P", "-m", module]
