"""The checked-in gRPC modules are exactly what grpcio-tools generates from the .proto."""

import shutil
import subprocess
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parents[2] / "proto"


def test_generated_modules_match_the_proto(tmp_path):
    shutil.copytree(PROTO / "kvrouter_proto", tmp_path / "kvrouter_proto", ignore=shutil.ignore_patterns("*_pb2*"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         "kvrouter_proto/worker.proto"],
        cwd=tmp_path, check=True,
    )
    for name in ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"):
        fresh = (tmp_path / "kvrouter_proto" / name).read_text()
        assert fresh == (PROTO / "kvrouter_proto" / name).read_text(), f"{name} is stale: run proto/generate.sh"
