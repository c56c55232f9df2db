"""The checked-in gRPC modules are exactly what grpcio-tools generates from the .proto."""

import shutil
from pathlib import Path

import grpc_tools
import pytest
from grpc_tools import protoc

PROTO = Path(__file__).resolve().parents[2] / "proto"


@pytest.mark.parametrize("stem", ["worker", "router"])
def test_generated_modules_match_the_proto(tmp_path, monkeypatch, stem):
    shutil.copytree(PROTO / "kvrouter_proto", tmp_path / "kvrouter_proto", ignore=shutil.ignore_patterns("*_pb2*"))
    monkeypatch.chdir(tmp_path)  # protoc writes relative to its include root, as proto/generate.sh runs it
    include = str(Path(grpc_tools.__file__).parent / "_proto")  # google/protobuf/*.proto, as `python -m` adds
    assert protoc.main(["protoc", "-I.", f"-I{include}", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
                        f"kvrouter_proto/{stem}.proto"]) == 0
    for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
        fresh = (tmp_path / "kvrouter_proto" / name).read_text()
        assert fresh == (PROTO / "kvrouter_proto" / name).read_text(), f"{name} is stale: run proto/generate.sh"


def test_generate_script_covers_every_proto():
    script = (PROTO / "generate.sh").read_text()
    for proto in (PROTO / "kvrouter_proto").glob("*.proto"):
        assert f"kvrouter_proto/{proto.name}" in script, f"proto/generate.sh does not regenerate {proto.name}"
