"""Property-based fuzz of the HTTP API from its own /openapi.json (schemathesis):
about 20 examples per operation (examples and fuzzing phases; the coverage phase
alone made ~1,500 cases and three minutes), valid and invalid, against a real server whose
--max-tokens-limit keeps valid requests cheap. No input may produce a 5xx or hang."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--no-kv-cache", "--max-tokens-limit", "2", "--max-body-mb", "1", name="fuzz")


def test_fuzzing_the_openapi_spec_finds_no_server_error_and_no_hang(server, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis is a test dependency (pip install -e '.[test]')"
    cmd = [st, "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
           "--phases", "examples,fuzzing", "--max-examples", "20", "--workers", "1",
           "--request-timeout", "60", "--seed", "7", "--no-color", "--generation-database", "none",
           "--report-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:] + "\n" + server.log_tail(40)
    assert "No issues found" in proc.stdout, proc.stdout[-3000:]
    # The fuzz reached generation (valid requests answered 200) on every generating endpoint.
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
        assert f'endpoint="{path}",status="200"' in metrics, path
    # Still serving afterwards.
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=50)
    assert r.usage.completion_tokens <= 2  # --max-tokens-limit caps every request
