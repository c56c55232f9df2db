"""deploy/: each file parses with a parser for its format and says what it must;
every metric the Grafana dashboard queries is exported by a real router's /metrics."""

from __future__ import annotations

import configparser
import json
import plistlib
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\bkvrouter_[a-z_]+\b")


def test_launchd_plist_runs_serve_at_boot_as_a_service_user_and_restarts_on_failure():
    with open(DEPLOY / "launchd" / "com.kvrouter.serve.plist", "rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "com.kvrouter.serve"
    args = plist["ProgramArguments"]
    assert args[0].endswith("/kvrouter") and args[1] == "serve"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart only when it failed
    assert plist["UserName"] and plist["UserName"] != "root"
    assert plist["StandardOutPath"].endswith(".log") and plist["StandardErrorPath"].endswith(".log")
    assert plist["ExitTimeOut"] >= 30  # time for workers to store their shutdown checkpoint


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "systemd" / "kvrouter.service")
    svc = unit["Service"]
    assert svc["ExecStart"].split()[0].endswith("/kvrouter") and svc["ExecStart"].split()[1] == "serve"
    assert svc["Restart"] == "on-failure"
    assert svc["User"] not in ("", "root")
    assert svc["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network" in unit["Unit"]["After"]


def test_prometheus_scrape_config():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "kvrouter"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]  # `kvrouter serve`'s default address


def dashboard_metrics() -> tuple[dict, set[str]]:
    dash = json.loads((DEPLOY / "grafana" / "kvrouter-dashboard.json").read_text())
    names = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names |= set(METRIC.findall(target["expr"]))
    return dash, names


def test_dashboard_has_the_panels_people_watch():
    dash, names = dashboard_metrics()
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for word in ("time to first token", "reuse ratio", "prefill tokens saved", "store size", "evictions",
                 "worker load"):
        assert word in titles
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert "kvrouter_time_to_first_token_seconds_bucket" in names


def exported_names(text: str) -> set[str]:
    """Every series name /metrics declares, with the suffixes of its type."""
    out = set()
    for fam in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(fam.type, [""])
        out |= {fam.name + s for s in suffixes}
        out |= {s.name for s in fam.samples}
    return out


@pytest.fixture
async def router_metrics_text(tmp_path):
    """GET /metrics from a real router app (no workers) over a real store with one checkpoint."""
    from aiohttp.test_utils import TestClient, TestServer

    from kvrouter.cachestore import CheckpointStore, StoreConfig
    from kvrouter.router.app import create_app
    from kvrouter.router.config import RouterConfig
    from kvrouter.router.cluster import Cluster

    store = CheckpointStore(StoreConfig(directory=tmp_path / "kv"))
    store.save("anchor", "model", "", list(range(600)), lambda p: p.write_bytes(b"x" * 1000))
    app = create_app(RouterConfig(store=store.config), cluster=Cluster([], store))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        text = await resp.text()
        missing = await client.get("/no/such/path")
        assert missing.status == 404
        text_after = await (await client.get("/metrics")).text()
    return text, text_after


async def test_every_dashboard_metric_is_exported_by_the_router(router_metrics_text):
    text, text_after = router_metrics_text
    _, queried = dashboard_metrics()
    exported = exported_names(text)
    assert queried <= exported, f"dashboard queries metrics /metrics lacks: {sorted(queried - exported)}"
    # store gauges are read from the index at scrape time
    assert 'kvrouter_store_entries{kind="anchor"} 1.0' in text
    assert 'kvrouter_store_bytes{kind="anchor"} 1000.0' in text
    assert 'kvrouter_store_entries{kind="waypoint"} 0.0' in text
    # the unknown path was counted as an error by class
    assert 'kvrouter_errors_total{error_class="HTTPNotFound",status="404"} 1.0' in text_after
