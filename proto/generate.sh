#!/usr/bin/env bash
# Regenerates the checked-in gRPC modules from the .proto files.
# Needs grpcio-tools (the `dev` extra); PYTHON picks the interpreter (default: python).
# tests/unit/test_proto_generated.py fails when the result differs from what is committed.
set -euo pipefail
cd "$(dirname "$0")"
for proto in kvrouter_proto/worker.proto kvrouter_proto/router.proto; do
  "${PYTHON:-python}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. "$proto"
done
