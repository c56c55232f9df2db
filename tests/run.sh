#!/usr/bin/env bash
# Installs what the test suite needs and runs it. Used by the README and by .ci/run.
#  - On Debian/Ubuntu as root, installs OpenBLAS (libopenblas0-pthread): MLX's CPU
#    backend is ~25x slower on the reference BLAS its wheel bundles.
#  - On Debian/Ubuntu as root, installs Prometheus (package prometheus) for the
#    observability end-to-end test.
#  - Creates .venv (if missing), installs kvrouter with its test extras, runs pytest
#    with OpenBLAS preloaded (the in-process model tests run MLX in pytest itself).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "warning: OpenBLAS not found; install libopenblas0-pthread or tests will be very slow" >&2
  fi
fi

# Debian's Prometheus server: tests/e2e/test_observability.py starts one on loopback.
if [ "$(uname -s)" = "Linux" ] && ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "warning: prometheus not found; install the 'prometheus' package or its e2e test is skipped" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# The in-process model tests (tests/model) run MLX inside pytest itself: with OpenBLAS
# preloaded, as every worker process is, they ran ~8x faster (2 long-prefill tests: 154 s -> 20 s).
OPENBLAS=$(ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 2>/dev/null | head -1 || true)
if [ -n "$OPENBLAS" ] && [ "${KVROUTER_NO_BLAS_PRELOAD:-0}" != "1" ]; then
  export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
fi
exec .venv/bin/python -m pytest "$@"
