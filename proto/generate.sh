#!/usr/bin/env bash
# Regenerates the checked-in gRPC modules from the .proto files.
# CI runs this and fails when the result differs from what is committed.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. kvrouter_proto/worker.proto
