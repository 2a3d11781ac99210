"""The deployment's configs loaded by the real programs on loopback.

- Prometheus started with ``deploy/prometheus/prometheus.yml`` loads the five alert rules, and
  every PromQL expression of the Grafana dashboard parses and evaluates on it
  (``/api/v1/query`` answers ``status: success``).
- Alertmanager started with ``deploy/alertmanager/alertmanager.yml`` inhibits a rotation alert
  while the same sidecar is down, and only for that sidecar.

Each server gets a free 127.0.0.1 port and a temporary data directory; the sidecars and
Alertmanager named in the config do not exist here, which Prometheus tolerates (failed scrapes).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, require_tool
from test_deploy import ALERTS, DASHBOARD, dashboard_exprs

pytestmark = [pytest.mark.multiprocess, pytest.mark.tools]

#: Values for Grafana's template variables, so the expressions are plain PromQL.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$topk": "10",
    "$node": ".*",
    "$param": ".*",
    "$k": ".*",
}
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(cmd: list[str], ready_url: str, log: Path) -> Iterator[None]:
    """Run ``cmd`` until ``ready_url`` answers 200, yield, then stop it (SIGTERM, then SIGKILL)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"{cmd[0]} exited {proc.returncode}:\n{log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1.0).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"{cmd[0]} not ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def substitute(expr: str) -> str:
    for name in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARS[name])
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


@pytest.mark.timeout(90)
def test_prometheus_loads_the_rules_and_parses_every_dashboard_expression(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # The deployment's config, evaluating every second instead of every 15 s (the rules and
    # everything else as deployed): a rule's health reads "unknown" until its first evaluation,
    # so right after ready a rule that fails there passed unseen. (Errors that need series to
    # match are the promtool unit tests' to find: tests/test_deploy.py.)
    deployed = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    config = deployed.replace("evaluation_interval: 15s", "evaluation_interval: 1s").replace(
        "  - rules/*.yml", f"  - {ROOT / 'deploy/prometheus/rules'}/*.yml")
    assert config.count("evaluation_interval: 1s") == 1 and "deploy/prometheus/rules/" in config
    (tmp_path / "prometheus.yml").write_text(config)
    cmd = [
        require_tool("prometheus"),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    ]
    exprs = [substitute(e) for e in dashboard_exprs(json.loads(DASHBOARD.read_text()))]
    assert len(exprs) >= 10
    with serve(cmd, f"{base}/-/ready", tmp_path / "prometheus.log"):
        deadline = time.monotonic() + 20
        while True:
            groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
            loaded = {r["name"]: r for g in groups for r in g["rules"]}
            if loaded and all(r["health"] != "unknown" for r in loaded.values()):
                break
            assert time.monotonic() < deadline, f"rules never evaluated: {loaded}"
            time.sleep(0.25)
        alerting = {name for name, r in loaded.items() if r["type"] == "alerting"}
        assert alerting == ALERTS
        assert set(loaded) - ALERTS == {"orthoshard:basis_rotation_jump_degrees"}
        assert all(r["health"] == "ok" for r in loaded.values()), loaded
        failures = {}
        for expr in exprs:
            answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5).json()
            if answer.get("status") != "success":
                failures[expr] = answer.get("error")
        assert not failures, failures
        # The check is not vacuous: a broken expression is refused by the same endpoint.
        bad = httpx.get(f"{base}/api/v1/query", params={"query": "topk(5, rate(x[1m]"}, timeout=5)
        assert bad.json()["status"] == "error"


def _alert(name: str, instance: str, **labels: str) -> dict:
    return {
        "labels": {"alertname": name, "instance": instance, "job": "orthoshard-sidecar", **labels},
        "annotations": {"summary": "test"},
    }


@pytest.mark.timeout(90)
def test_alertmanager_inhibits_rotation_alerts_of_a_down_sidecar(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        require_tool("prometheus-alertmanager"),
        f"--config.file={ROOT / 'deploy/alertmanager/alertmanager.yml'}",
        f"--storage.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    rotation = {"param": "layers.0.attn.q.weight", "factor": "L", "k": "1"}
    alerts = [
        _alert("OptimizerSidecarDown", "sidecar-0:9400", severity="critical"),
        _alert("OptimizerBasisRotationSpike", "sidecar-0:9400", severity="warning", **rotation),
        _alert("OptimizerBasisRotationSpike", "sidecar-1:9400", severity="warning", **rotation),
    ]
    with serve(cmd, f"{base}/-/ready", tmp_path / "alertmanager.log"):
        assert httpx.post(f"{base}/api/v2/alerts", json=alerts, timeout=5).status_code == 200
        deadline = time.monotonic() + 20
        while True:
            got = httpx.get(f"{base}/api/v2/alerts", timeout=5).json()
            state = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"] for a in got}
            done = state.get(("OptimizerBasisRotationSpike", "sidecar-0:9400"), {}).get("state")
            if len(state) == 3 and done == "suppressed":
                break
            assert time.monotonic() < deadline, f"no inhibition: {state}"
            time.sleep(0.2)
        inhibited = state[("OptimizerBasisRotationSpike", "sidecar-0:9400")]
        assert inhibited["inhibitedBy"], inhibited
        assert state[("OptimizerBasisRotationSpike", "sidecar-1:9400")]["state"] == "active"
        assert state[("OptimizerSidecarDown", "sidecar-0:9400")]["state"] == "active"
        status = httpx.get(f"{base}/api/v2/status", timeout=5).json()
        assert re.search(r"OptimizerSidecarDown", status["config"]["original"])
