"""The README's main job end to end: ``orthoshard demo``, and the alert path it feeds.

- A short demo run writes ``summary.json`` and ``health.png``, its sidecar served every hidden
  matrix's health, and the loss fell.
- With ``--spike-at``, a real Prometheus scraping the demo's sidecar every second (the fast rule
  profile, ``deploy/prometheus/rules-fast``) raises ``OptimizerBasisRotationSpike``, and an
  Alertmanager with the fast profile's config (``deploy/alertmanager/alertmanager-fast.yml``)
  delivers it to a webhook, naming the matrix; the same run without the spike does neither.
  Both runs go side by side to halve the wall time.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import matplotlib.image
import numpy as np
import pytest
from conftest import ROOT, killed_whole, require_tool, run_whole
from test_deploy_live import free_port, serve

from orthoshard.report import health_panels, load_health

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

FAST_RULES = ROOT / "deploy" / "prometheus" / "rules-fast" / "orthoshard.rules.yml"
FAST_ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager-fast.yml"
RECEIVER_URL = "http://127.0.0.1:5001/orthoshard-alerts"  # the config's webhook, replaced here
SPIKE_QUERY = 'ALERTS{alertname="OptimizerBasisRotationSpike",alertstate="firing"}'
# Timing of the alert runs. The fast rules compare a 5 s window against a 20 s baseline offset
# by 5 s, so the spike needs ~25 s of calm history first, and the rules stay quiet until the
# sidecar's step series are that old (a fresh sidecar): 60 steps of >= 0.5 s. The sidecar's
# rotation hold keeps the one-step spike on /metrics until the 1 s scrape sees it; 2 s is to the
# fast profile's 5 s jump window what the default 30 s is to the production 2 min window. After
# the spike, 12 steps and the linger keep the sidecar up ~14 s: the alert needs ~5 (hold,
# scrape, one evaluation, its 2 s "for").
SPIKE_AT, STEPS, STEP_DELAY_S, LINGER_S, ROTATION_HOLD_S = 60, 72, 0.5, 8, 2.0


def _sigint_at_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _demo(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orthoshard.cli", "demo", "--out", str(out), *extra]


@pytest.mark.timeout(240)
def test_demo_writes_summary_and_plot_and_its_sidecar_serves_every_matrix(tmp_path):
    out = tmp_path / "out"
    # run_whole: a timeout kills the demo's sidecar and torchrun with it (torchrun runs in a
    # session of its own, which killing the demo alone would orphan)
    proc = run_whole(_demo(out, "--steps", "40"), timeout=220, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == "Muon" and summary["world_size"] == 2
    assert summary["final_loss"] < summary["initial_loss"] - 0.5  # ln(64) = 4.16 -> ~2
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "fc", "out")}
    assert set(summary["health"]) == hidden
    assert set(summary["health_served_by_sidecar"]) == hidden
    assert set(summary["owner_rank"].values()) == {0, 1}  # both ranks own matrices
    # what the summary says the sidecar served is what its store holds (read here from the
    # database the demo leaves), and that is each matrix's last health exactly as its owner
    # reported it (JSON round-trips floats exactly), under the rank that owns it
    with contextlib.closing(sqlite3.connect(f"file:{out / 'sidecar.db'}?mode=ro",
                                            uri=True)) as db:
        stored = {name: (rank, json.loads(metrics)) for name, rank, metrics
                  in db.execute("SELECT name, rank, metrics FROM params")}
    assert {n: m for n, (_, m) in stored.items()} == summary["health_served_by_sidecar"]
    assert {n: r for n, (r, _) in stored.items()} == summary["owner_rank"]
    assert summary["health_served_by_sidecar"] == summary["health"]
    for rank in (0, 1):
        reported = json.loads((out / f"rank{rank}.json").read_text())["health"]
        assert {n for n, r in summary["owner_rank"].items() if r == rank} == set(reported)
    for metrics in summary["health_served_by_sidecar"].values():
        assert 0.0 < metrics["orthogonality_error"] < 0.6  # Jordan quintic sits near 0.35
    assert all(v["bytes_sent"] > 0 and v["steps"] == 40
               for v in summary["bytes_communicated"].values())
    png = (out / "health.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the loss and one panel per reported metric, 5.3 x 4 in each at 100 dpi, three a row,
    # and drawn on (far more than the white background and the axes' black)
    panels = 1 + len(health_panels(load_health(out)))
    cols = min(3, panels)
    image = matplotlib.image.imread(out / "health.png")
    assert image.shape[:2] == (400 * -(-panels // cols), 530 * cols)
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 100
    assert "sidecar:" in proc.stdout and "blocks.0.qkv.weight" in proc.stdout


@pytest.mark.timeout(90)
def test_a_port_held_by_another_sidecar_stops_the_demo_before_it_touches_the_last_results(
        tmp_path):
    # /healthz of the sidecar already on the port was taken for the demo's own: training ran
    # against it (401 on every snapshot) and the demo ended in a traceback. Now it is refused
    # before anything starts, and the last run's results stay as they were (they were deleted
    # first, and the refused run left nothing in their place)
    from test_service_live import start_sidecar

    other = start_sidecar(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("summary.json", "health.png", "final_params.pt"):
        (out / name).write_text("an earlier run")
    try:
        proc = subprocess.run(_demo(out, "--steps", "5", "--sidecar-port", str(other.port)),
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        other.stop()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"orthoshard demo: --sidecar-port {other.port} is taken on 127.0.0.1 (Address " \
        f"already in use)" in proc.stderr and "Traceback" not in proc.stderr
    assert all((out / name).read_text() == "an earlier run"
               for name in ("summary.json", "health.png", "final_params.pt"))


@pytest.mark.timeout(60)
def test_checkpoints_it_could_not_write_stop_the_demo_before_it_touches_the_last_results(
        tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("an earlier run")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    proc = subprocess.run(_demo(out, "--steps", "5", "--checkpoint-dir", str(blocker / "ckpt"),
                                "--checkpoint-every", "2"),
                          capture_output=True, text=True, timeout=45, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("orthoshard demo: ") and "Traceback" not in proc.stderr
    assert str(blocker) in proc.stderr
    assert (out / "summary.json").read_text() == "an earlier run"


def test_an_output_path_that_is_a_file_is_refused_by_name(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    proc = subprocess.run(_demo(blocker / "sub", "--steps", "5"), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and f"orthoshard demo: cannot use --out {blocker / 'sub'}" \
        in proc.stderr and "Traceback" not in proc.stderr


def _alive(pattern: str) -> dict[int, str]:
    """``pid -> command line`` of the running processes whose command line contains
    ``pattern``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if pattern in cmdline:
                found[int(entry.name)] = cmdline
    return found


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("sig", "group"), [
    (signal.SIGTERM, False), (signal.SIGINT, False),
    (signal.SIGINT, True),  # a terminal's Ctrl-C: the whole foreground process group
], ids=["SIGTERM", "SIGINT", "Ctrl-C"])  # SIGHUP takes SIGTERM's handler: test_cli_args.py
def test_a_signal_stops_the_trainers_and_the_sidecar(tmp_path, sig, group):
    # SIGTERM (kill, timeout, a CI runner) skipped the demo's cleanup: the sidecar, torchrun
    # and both ranks went on running, orphaned; Ctrl-C (SIGINT) ended in a traceback. A
    # terminal's Ctrl-C reached every rank and torchrun too: a traceback from each (81 lines).
    # A shell without job control starts its background commands with SIGINT ignored, and an
    # ignored signal stays ignored across exec: run from such a shell (`pytest ... &` in a
    # script), the demo would rightly ignore the SIGINT this test sends. A terminal's shell
    # starts a foreground job with SIGINT at its default, so the demo starts that way here.
    out = tmp_path / "signal-out"
    proc = subprocess.Popen(_demo(out, "--steps", "2000", "--step-delay", "0.05"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=group, preexec_fn=_sigint_at_default)
    try:
        deadline = time.monotonic() + 100
        while not (out / "loss.jsonl").exists() or not (out / "loss.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, \
                proc.stderr.read()[-3000:]
            time.sleep(0.5)
        assert len(_alive(str(out))) >= 3  # the demo, its sidecar, torchrun and the ranks
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
        # no traceback: not the demo's, nor torchrun's SignalException (which read as a crash
        # after the ranks had stopped cleanly)
        err = proc.stderr.read()
        assert "Traceback" not in err, err[-3000:]
        assert "stopped by SIGTERM after step" in err  # each rank finished its step
        if sig == signal.SIGINT:
            assert "orthoshard demo: interrupted" in err
        if group:  # only the demo had the Ctrl-C; it stopped torchrun, and torchrun its ranks
            assert "KeyboardInterrupt" not in err, err[-3000:]
            # the sidecar, stopped last, took the ranks' last snapshots (a Ctrl-C that reached
            # it stopped it first: "sidecar unreachable", the snapshots left queued)
            assert "sidecar unreachable" not in err and "still queued" not in err, err[-3000:]
        deadline = time.monotonic() + 30
        while _alive(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _alive(str(out)) == {}
    finally:  # whatever went wrong, leave no process of this run behind
        proc.kill()
        for pid in _alive(str(out)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _prometheus(tmp: Path, sidecar_port: int, *, node: str,
                alertmanager: str) -> tuple[list[str], str]:
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{FAST_RULES}"]
alerting: {{alertmanagers: [{{static_configs: [{{targets: ["{alertmanager}"]}}]}}]}}
scrape_configs:
  - job_name: orthoshard-sidecar
    static_configs: [{{targets: ["127.0.0.1:{sidecar_port}"], labels: {{node: "{node}"}}}}]
""")
    cmd = [require_tool("prometheus"), f"--config.file={config}",
           f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    return cmd, f"http://127.0.0.1:{port}"


def _query(url: str, promql: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.tools
@pytest.mark.timeout(420)
def test_rotation_spike_alert_fires_and_pages_with_the_spike_and_stays_silent_without(tmp_path):
    runs = {}
    with contextlib.ExitStack() as stack:
        pages = stack.enter_context(_webhook())
        alertmanager = stack.enter_context(_alertmanager(tmp_path, pages["url"]))
        for case in ("spike", "calm"):
            tmp = tmp_path / case
            tmp.mkdir()
            sidecar_port = free_port()
            cmd, url = _prometheus(tmp, sidecar_port, node=case, alertmanager=alertmanager)
            stack.enter_context(serve(cmd, f"{url}/-/ready", tmp / "prometheus.log"))
            # One rank each: the alert reads the sidecar's series, which one rank sends as two
            # do (the two-rank demo has its own test), and two demos of two ranks each with their
            # Prometheus took 1.2 cores for ~95 s, one rank each 0.9 core for ~75 s (alone)
            extra = ["--optimizer", "soap", "--nproc", "1", "--steps", str(STEPS),
                     "--step-delay", str(STEP_DELAY_S), "--sidecar-port", str(sidecar_port),
                     "--rotation-hold", str(ROTATION_HOLD_S), "--linger",
                     str(LINGER_S)] + (["--spike-at", str(SPIKE_AT)] if case == "spike" else [])
            log = (tmp / "demo.log").open("w")
            proc = stack.enter_context(killed_whole(subprocess.Popen(
                _demo(tmp / "out", *extra), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True)))  # killed whole if the test fails
            runs[case] = {"proc": proc, "url": url, "fired": False, "log": tmp / "demo.log"}
        deadline = time.monotonic() + 360
        while any(r["proc"].poll() is None for r in runs.values()):
            assert time.monotonic() < deadline, "demo runs did not finish in time"
            for r in runs.values():
                if r["proc"].poll() is None and _query(r["url"], SPIKE_QUERY):
                    r["fired"] = True
            time.sleep(1.0)
        for case, r in runs.items():
            assert r["proc"].returncode == 0, r["log"].read_text()[-3000:]
            # The calm run's silence means something only if Prometheus saw rotations at all.
            seen = _query(r["url"], "count(max_over_time(orthoshard_basis_rotation_degrees[10m]))")
            assert seen and float(seen[0]["value"][1]) == 32, case  # 8 matrices x L/R x k=1/8
            ever = _query(r["url"], f"max_over_time({SPIKE_QUERY}[10m])")
            r["fired"] = r["fired"] or bool(ever)
        # the page follows the alert by Alertmanager's group_wait (1 s in the fast config)
        deadline = time.monotonic() + 30
        while not _paged(pages["bodies"], "spike") and time.monotonic() < deadline:
            time.sleep(0.5)
    assert runs["spike"]["fired"], "OptimizerBasisRotationSpike did not fire on the spike"
    assert not runs["calm"]["fired"], "OptimizerBasisRotationSpike fired without a spike"
    paged = _paged(pages["bodies"], "spike")
    assert paged, f"the spike fired but did not page: {pages['bodies']}"
    assert not _paged(pages["bodies"], "calm"), pages["bodies"]
    # the page names the matrix side that turned, with its runbook
    labels = paged[0]["labels"]
    assert labels["param"].startswith("blocks.") and labels["factor"] in ("L", "R"), labels
    assert labels["severity"] == "warning" and "runbook" in paged[0]["annotations"], paged[0]


def _paged(bodies: list[dict], node: str) -> list[dict]:
    """The firing rotation alerts of ``node`` among the webhook's notifications."""
    return [a for body in bodies for a in body["alerts"] if a["status"] == "firing"
            and a["labels"].get("alertname") == "OptimizerBasisRotationSpike"
            and a["labels"].get("node") == node]


@contextlib.contextmanager
def _webhook() -> Iterator[dict]:
    """An HTTP receiver on a free loopback port that keeps every JSON body POSTed to it."""
    bodies: list[dict] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}/orthoshard-alerts",
               "bodies": bodies}
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _alertmanager(tmp: Path, receiver: str) -> Iterator[str]:
    """Alertmanager with the fast profile's config, its webhook pointed at ``receiver``;
    yields its ``host:port``."""
    text = FAST_ALERTMANAGER.read_text()
    assert RECEIVER_URL in text
    config = tmp / "alertmanager.yml"
    config.write_text(text.replace(RECEIVER_URL, receiver))
    port = free_port()
    cmd = [require_tool("prometheus-alertmanager"), f"--config.file={config}",
           f"--storage.path={tmp / 'alertmanager-data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]
    with serve(cmd, f"http://127.0.0.1:{port}/-/ready", tmp / "alertmanager.log"):
        yield f"127.0.0.1:{port}"
