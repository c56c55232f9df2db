"""Observability end to end: a real `kvrouter serve` on the default model, a little
traffic through the official `openai` client, then (1) its /metrics carries the
per-request worker figures, routing decisions, errors by class and the scrape-time
store and queue gauges, and (2) a real Prometheus server (Debian's `prometheus`,
started here on loopback with a generated scrape config) has scraped the
time-to-first-token series, queried through its HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.prompts import long_system_prompt
from tests.support.server import SMALL_KV_FLAGS, free_port

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = long_system_prompt()


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    kv = tmp_path_factory.mktemp("obs-kv")
    return start_server("--kv-cache-dir", str(kv), *SMALL_KV_FLAGS, name="observability")


@pytest.fixture(scope="module")
def traffic(server):
    """Two streamed chats sharing the long system prompt, one plain chat, one unknown model."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)
    for question in ("What does rule 3 say?", "Which rule is about the parser?"):
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=5, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    return 3  # successful generations


def scrape(server) -> dict[str, list]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def total(samples, name, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_cover_requests_workers_routing_errors_and_store(server, traffic):
    m = scrape(server)
    assert total(m, "kvrouter_time_to_first_token_seconds_count", model=MODEL) == traffic
    assert total(m, "kvrouter_inter_token_latency_seconds_count", model=MODEL) >= 4 * 2  # 5-token replies
    assert total(m, "kvrouter_request_seconds_count", model=MODEL) == traffic
    assert total(m, "kvrouter_routing_decisions_total") == traffic
    assert total(m, "kvrouter_routing_decision_seconds_count") == traffic
    # the second chat reused the shared system prompt (live state or checkpoint), the first computed it
    reused = sum(total(m, "kvrouter_prompt_tokens_total", source=s) for s in ("live", "ram", "disk"))
    assert reused > 500
    assert total(m, "kvrouter_prompt_tokens_total", source="computed") > 700
    assert total(m, "kvrouter_prefill_seconds_count") >= 1
    # the cold anchor was stored (worker-side event, shipped with the request) and is in the index
    assert total(m, "kvrouter_checkpoint_events_total", action="stored", kind="anchor") >= 1
    assert total(m, "kvrouter_checkpoint_store_bytes_count", kind="anchor") >= 1
    assert total(m, "kvrouter_store_entries", kind="anchor") >= 1
    assert total(m, "kvrouter_store_bytes", kind="anchor") > 10 * 2**20  # 46 KB per token, fp32
    # no --kv-cache-disk-mb: the worker sized the budget (10 checkpoints of the 135M model's
    # context, 46 KB/token, are below the 4096 MiB floor; a disk with less than 8 GiB free
    # caps it at half of that), printed it at start and reported it
    sized = re.search(r"disk budget (\d+) MiB = ", server.log_path.read_text())
    assert sized, "the worker's start line names the disk budget"
    assert 256 <= int(sized.group(1)) <= 4096
    assert total(m, "kvrouter_store_budget_bytes") == int(sized.group(1)) * 2**20
    assert total(m, "kvrouter_errors_total", error_class="NotFound", status="404") == 1
    assert total(m, "kvrouter_worker_healthy", worker="w0") == 1
    assert [s.value for s in m["kvrouter_worker_queue_depth"]] == [0.0]  # read from the worker's GetStatus
    assert total(m, "kvrouter_worker_in_flight", worker="w0") == 0


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is missing (Debian package `prometheus`; tests/run.sh installs it)")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    target = server.url.removeprefix("http://")
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: kvrouter\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(work / 'prometheus.log').read_text()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def test_prometheus_scrapes_time_to_first_token(prometheus, traffic):
    query = 'sum(kvrouter_time_to_first_token_seconds_count{job="kvrouter"})'
    deadline = time.monotonic() + 60
    result = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{prometheus}/api/v1/query?query={urllib.parse.quote(query)}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success"
        result = body["data"]["result"]
        if result and float(result[0]["value"][1]) >= traffic:
            break
        time.sleep(1)
    assert result and float(result[0]["value"][1]) == traffic
    q = 'histogram_quantile(0.5, sum by (le) (kvrouter_time_to_first_token_seconds_bucket))'
    with urllib.request.urlopen(f"{prometheus}/api/v1/query?query={urllib.parse.quote(q)}", timeout=10) as r:
        p50 = float(json.load(r)["data"]["result"][0]["value"][1])
    assert 0 < p50 < 120
