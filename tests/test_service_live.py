"""The sidecar as a real process: uvicorn on loopback TCP and a Unix socket, the real
Publisher, restart durability, a killed sidecar under a publishing loop, a real Prometheus.

Each test starts ``python -m orthoshard.cli sidecar`` in a temp dir with a fresh token file
and database, and stops it with SIGTERM (or SIGKILL where that is the point).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, require_tool

from service.client import Publisher
from service.server import HEADER_TIMEOUT_S, SHUTDOWN_GRACE_S
from service.store import CLOSE_WAIT_S, Store

pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sidecar:
    """A running sidecar process and how to reach it."""

    proc: subprocess.Popen[bytes]
    port: int
    uds: str
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, via_uds: bool = False) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.uds) if via_uds else None
        base = "http://sidecar" if via_uds else self.url
        return httpx.Client(
            base_url=base,
            transport=transport,
            timeout=5,
            headers={"Authorization": f"Bearer {self.token}"},
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)


def start_sidecar(tmp: Path, *, port: int | None = None, token: str | None = None,
                  extra: tuple[str, ...] = (), file_size_limit: int | None = None) -> Sidecar:
    """Start a sidecar on ``tmp/state.db`` (``extra``: more of its options; ``file_size_limit``:
    its ``RLIMIT_FSIZE``, in bytes) and wait until both listeners answer /healthz."""
    token = token or secrets.token_hex(16)
    token_file = tmp / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = port or free_port()
    uds = str(tmp / "sidecar.sock")
    cmd = [
        sys.executable,
        "-m",
        "orthoshard.cli",
        "sidecar",
        "--port",
        str(port),
        "--uds",
        uds,
        "--token-file",
        str(token_file),
        "--db",
        str(tmp / "state.db"),
        "--log-level",
        "warning",
        *extra,
    ]
    with (tmp / "sidecar.log").open("ab") as log:  # its stderr, for what it logs
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=log, preexec_fn=_file_size_limit(
            file_size_limit))
    car = Sidecar(proc, port, uds, token)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with car.client() as tcp, car.client(via_uds=True) as unix:
                if tcp.get("/healthz").status_code == unix.get("/healthz").status_code == 200:
                    return car
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("sidecar did not come up within 20 s")


def _file_size_limit(limit: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that limits the size of the files a process writes (what a quota does:
    a write beyond it fails, with EFBIG; Python ignores SIGXFSZ)."""
    if limit is None:
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Sidecar]:
    car = start_sidecar(tmp_path)
    yield car
    if car.proc.poll() is None:
        car.stop()


def health(step: int, n: int = 4) -> dict[str, dict[str, float]]:
    return {
        f"layers.{i}.attn.w": {
            "orthogonality_error": 0.001 * step,
            "update_rms": 0.1,
            "eigengap_ratio_L": 0.25,
            "rotation_degrees_L_k1": float(i),
            "rotation_degrees_R_k8": 2.0,
            "nonfinite_skips": 1.0,
        }
        for i in range(n)
    }


@pytest.mark.timeout(60)
def test_publisher_feeds_a_real_sidecar_over_tcp_and_unix_socket(sidecar: Sidecar) -> None:
    tcp = Publisher(url=sidecar.url, token=sidecar.token, run_id="live")
    uds = Publisher(uds=sidecar.uds, token=sidecar.token, run_id="live")
    for step in range(1, 21):
        tcp.publish(step=step, rank=0, params=health(step))
        uds.publish(step=step, rank=1, params={"head.w": {"orthogonality_error": 0.5}})
    assert tcp.close(timeout_s=10) and uds.close(timeout_s=10)
    assert tcp.stats.sent == uds.stats.sent == 20
    with sidecar.client(via_uds=True) as c:
        ranks = c.get("/v1/optimizer").json()["ranks"]
        assert [(r["rank"], r["step"], r["snapshots_received"]) for r in ranks] == [
            (0, 20, 20),
            (1, 20, 20),
        ]
        assert c.get("/v1/params/layers.3.attn.w").json()["metrics"]["rotation_degrees_L_k1"] == 3.0
    with sidecar.client() as c:
        lines = c.get("/metrics").text.splitlines()
        points = c.get("/v1/params/head.w/history", params={"from_step": 5, "to_step": 9}).json()
    assert 'orthoshard_orthogonality_error{param="layers.2.attn.w"} 0.02' in lines
    assert 'orthoshard_snapshots_received_total{rank="1"} 20.0' in lines
    assert [p["step"] for p in points["points"]] == [5, 6, 7, 8, 9]


@pytest.mark.timeout(60)
def test_restart_on_the_same_db_keeps_history_and_last_state(tmp_path: Path) -> None:
    car = start_sidecar(tmp_path)
    pub = Publisher(uds=car.uds, token=car.token, run_id="durable")
    for step in range(10):
        pub.publish(step=step, rank=2, params=health(step, n=2))
    assert pub.close(timeout_s=10, finished=True)  # the run ended
    assert car.stop() == 0 and not os.path.exists(car.uds)
    again = start_sidecar(tmp_path, token=car.token)
    try:
        with again.client() as c:
            assert c.get("/readyz").status_code == 200
            hist = c.get("/v1/params/layers.1.attn.w/history").json()
            assert [p["step"] for p in hist["points"]] == list(range(10))
            assert c.get("/v1/params/layers.1.attn.w").json()["step"] == 9
            (rank,) = c.get("/v1/optimizer").json()["ranks"]
            assert rank["snapshots_received"] == 10 and rank["finished_at"] is not None
            metrics = c.get("/metrics").text
            assert 'orthoshard_optimizer_step{rank="2"} 9.0' in metrics
            # finished, also after the restart: nothing for OptimizerSnapshotStale to read
            assert 'orthoshard_last_snapshot_timestamp_seconds{rank="2"}' not in metrics
    finally:
        again.stop()


@pytest.mark.timeout(90)
def test_a_killed_sidecar_costs_the_loop_only_snapshots_and_a_restart_resumes(
    tmp_path: Path,
) -> None:
    car = start_sidecar(tmp_path)
    pub = Publisher(url=car.url, token=car.token, run_id="kill", timeout_s=0.5,
                    queue_size=8, backoff_s=(0.01, 0.2))
    params = health(1, n=200)
    for step in range(200):
        pub.publish(step=step, rank=0, params=params)
        time.sleep(0.002)  # stands in for a training step
    car.proc.kill()  # SIGKILL: no graceful shutdown, connections just die
    car.proc.wait(timeout=10)
    # publish only appends to a deque: the loop goes on while every send fails (that it never
    # waits is tests/test_service_core.py's; what it costs, bench/sidecar.py's)
    for step in range(200, 400):
        pub.publish(step=step, rank=0, params=params)
        time.sleep(0.002)
    _until(lambda: pub.stats.failures >= 1, "no failed send to the killed sidecar")
    sent_before = pub.stats.sent
    # a sidecar back on the same port and database: the publisher resumes by itself
    again = start_sidecar(tmp_path, port=car.port, token=car.token)
    try:
        for step in range(400, 410):
            pub.publish(step=step, rank=0, params=params)
        assert pub.close(timeout_s=20) is False  # the queue dropped some while the sidecar was gone
        st = pub.stats
        assert st.published == 410 and st.published == st.sent + st.dropped + st.rejected
        assert st.sent > sent_before and st.dropped > 0 and st.rejected == 0
        with again.client() as c:
            (rank,) = c.get("/v1/optimizer").json()["ranks"]
            # the last snapshot arrived; history kept what the first sidecar stored
            assert rank["step"] == 409
            hist = c.get("/v1/params/layers.0.attn.w/history",
                         params={"from_step": 0, "to_step": 409}).json()["points"]
            assert hist[0]["step"] == 0 and hist[-1]["step"] == 409
    finally:
        again.stop()


def _until(check: Callable[[], bool], why: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, why
        time.sleep(0.02)


# ------------------------------------------------------------------------------ prometheus


def _query(client: httpx.Client, promql: str) -> list[dict]:
    body = client.get("/api/v1/query", params={"query": promql}).json()
    assert body["status"] == "success", body
    result: list[dict] = body["data"]["result"]
    return result


# 0.001 * 42 travels as JSON, is exposed with repr and parsed by Prometheus as float64: each hop
# round-trips exactly (the integral values next to it compare with ==); 1e-12 would still allow
# one re-formatting at 12 significant digits.
PROMETHEUS_FLOAT_RTOL = 1e-12


@pytest.mark.tools
@pytest.mark.timeout(90)
def test_real_prometheus_scrapes_the_sidecar(sidecar: Sidecar, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    pub = Publisher(url=sidecar.url, token=sidecar.token, run_id="prom")
    pub.publish(step=42, rank=3, params=health(42, n=2))
    assert pub.close(timeout_s=10)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: orthoshard\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{sidecar.port}']}}]\n"
    )
    web = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{web}", timeout=5) as prom:
            series = _wait_for(prom, "orthoshard_basis_rotation_degrees", want=4, within_s=45)
            got = {
                (s["metric"]["param"], s["metric"]["factor"], s["metric"]["k"]): float(
                    s["value"][1]
                )
                for s in series
            }
            assert got == {
                ("layers.0.attn.w", "L", "1"): 0.0,
                ("layers.1.attn.w", "L", "1"): 1.0,
                ("layers.0.attn.w", "R", "8"): 2.0,
                ("layers.1.attn.w", "R", "8"): 2.0,
            }
            step = _query(prom, "orthoshard_optimizer_step")
            assert [(s["metric"]["rank"], s["value"][1]) for s in step] == [("3", "42")]
            orth = _query(prom, 'orthoshard_orthogonality_error{param="layers.1.attn.w"}')
            assert float(orth[0]["value"][1]) == pytest.approx(0.042, rel=PROMETHEUS_FLOAT_RTOL)
            assert _query(prom, "orthoshard_snapshots_received_total")[0]["value"][1] == "1"
            assert _query(prom, 'up{job="orthoshard"}')[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


FAST_RULES = ROOT / "deploy" / "prometheus" / "rules-fast" / "orthoshard.rules.yml"
STALE_FIRING = 'ALERTS{alertname="OptimizerSnapshotStale",alertstate="firing"}'


# the sidecar's --series-ttl in the stale test: past the fast profile's 10 s + 2 s, so that the
# alert fires first, and short enough to wait out (rotation hold below it, as the sidecar needs)
SHORT_TTL_S = 14


@pytest.mark.tools
@pytest.mark.timeout(120)
def test_a_rank_that_stops_pages_as_stale_past_the_ttl_and_a_finished_run_does_not(
    tmp_path: Path
) -> None:
    # The fast rule profile: stale after 10 s without a snapshot, for 2 s, 1 s scrapes. Rank 0's
    # run ends normally (close(finished=True)); rank 1 just stops, as a hung or dead rank does,
    # and still pages once the sidecar's TTL has passed (its timestamp left /metrics then, and
    # the alert resolved while the rank was still dead)
    prometheus = require_tool("prometheus")
    sidecar = start_sidecar(tmp_path, extra=("--series-ttl", str(SHORT_TTL_S),
                                             "--rotation-hold", "1"))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f'rule_files: ["{FAST_RULES}"]\n'
        "scrape_configs:\n"
        "  - job_name: orthoshard-sidecar\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{sidecar.port}']}}]\n"
    )
    web = free_port()
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{web}", timeout=5) as prom:
            pubs = [Publisher(url=sidecar.url, token=sidecar.token, run_id="ends") for _ in (0, 1)]
            for rank, pub in enumerate(pubs):
                pub.publish(step=1, rank=rank, params=health(1, n=1))
            # both ranks' liveness is scraped before either goes quiet
            _wait_for(prom, "orthoshard_last_snapshot_timestamp_seconds", want=2, within_s=45)
            assert pubs[0].close(timeout_s=10, finished=True)
            assert pubs[1].close(timeout_s=10)
            stopped = time.monotonic()
            deadline = time.monotonic() + 40
            while not _query(prom, STALE_FIRING):
                assert time.monotonic() < deadline, "OptimizerSnapshotStale never fired"
                time.sleep(0.5)
            time.sleep(3)  # past rank 0's own 10 s + 2 s as well
            firing = _query(prom, f"max_over_time({STALE_FIRING}[1m])")
            assert sorted(s["metric"]["rank"] for s in firing) == ["1"]
            # rank 0 was alive, then finished: its timestamp is gone
            live = _query(prom, "orthoshard_last_snapshot_timestamp_seconds")
            assert sorted(s["metric"]["rank"] for s in live) == ["1"]
            # past the TTL, and past a scrape and an evaluation after it: still firing; the
            # finished rank's step has expired, the dead one's has not
            time.sleep(max(0.0, stopped + SHORT_TTL_S + 4 - time.monotonic()))
            firing = _query(prom, STALE_FIRING)
            assert sorted(s["metric"]["rank"] for s in firing) == ["1"]
            steps = _query(prom, "orthoshard_optimizer_step")
            assert sorted(s["metric"]["rank"] for s in steps) == ["1"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        sidecar.stop()


def _wait_for(prom: httpx.Client, promql: str, *, want: int, within_s: float) -> list[dict]:
    """Poll the query API until ``want`` series answer (the first scrape lands ~6 s in)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            # While it starts, Prometheus answers 503 "Service Unavailable" (plain text).
            if prom.get("/-/ready").status_code == 200:
                result = _query(prom, promql)
                if len(result) >= want:
                    return result
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{promql}: fewer than {want} series after {within_s} s")


# ------------------------------------------------------------------------------ end to end


@pytest.mark.timeout(120)
def test_real_optimizer_health_through_publisher_into_sidecar(sidecar: Sidecar) -> None:
    import torch

    from optim import SOAP
    from orthoshard.telemetry import publish_health

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(16, 8, bias=False)
    )
    opt = SOAP(model.named_parameters(), lr=1e-2)
    pub = Publisher(uds=sidecar.uds, token=sidecar.token, run_id="e2e")
    reported: dict[str, dict[str, float]] = {}
    steps: list[dict[str, dict[str, float]]] = []
    for step in range(1, 6):
        opt.zero_grad()
        model(torch.randn(8, 32)).square().mean().backward()
        opt.step()
        reported = publish_health(pub, opt, step=step, rank=0, with_summary=step == 5)
        steps.append(reported)
    assert pub.close(timeout_s=10) and pub.stats.rejected == 0
    assert set(reported) == {"0.weight", "1.weight"}
    with sidecar.client() as c:
        detail = c.get("/v1/params/0.weight").json()
        text = c.get("/metrics").text
    assert detail["step"] == 5
    assert detail["metrics"] == pytest.approx(reported["0.weight"], rel=0, abs=0)
    state = detail["state"]  # the optimizer summary: shape, owner and L's top eigenvalues
    assert state["shape"] == [16, 32] and state["owner_rank"] == 0
    eig = state["eigenvalues"]["L"]
    assert len(eig) == 8 and eig == sorted(eig, reverse=True)
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    key = ("orthoshard_basis_rotation_degrees",
           (("factor", "L"), ("k", "1"), ("param", "0.weight")))
    # Rotation gauges hold the largest value of the last --rotation-hold (30 s): all five steps.
    assert samples[key] == max(r["0.weight"]["rotation_degrees_L_k1"] for r in steps)
    gap = ("orthoshard_eigengap_ratio", (("factor", "L"), ("param", "0.weight")))
    assert samples[gap] == reported["0.weight"]["eigengap_ratio_L"]  # other gauges: the latest


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)])
def test_a_client_stalled_mid_body_does_not_keep_the_sidecar_up(
    sidecar: Sidecar, signals: tuple[int, ...]
) -> None:
    """A trainer that dies halfway through a POST leaves its connection open; SIGTERM stops the
    sidecar once the grace period ends, a second Ctrl-C at once, and the store is closed."""
    with socket.create_connection(("127.0.0.1", sidecar.port)) as stalled:
        stalled.sendall(
            f"POST /v1/snapshots HTTP/1.1\r\nHost: sidecar\r\nAuthorization: Bearer "
            f"{sidecar.token}\r\nContent-Type: application/json\r\nContent-Length: 1000"
            '\r\n\r\n{"schema_version": 1,'.encode()
        )
        time.sleep(0.3)  # the request is being read
        for sig in signals:
            sidecar.proc.send_signal(sig)
            time.sleep(0.2)
        status = sidecar.proc.wait(timeout=SHUTDOWN_GRACE_S + 10)  # hung for good before
    assert status == 0
    # one signal waits out the grace period and then cancels the stalled request (uvicorn says
    # so at error level); a second one forces the exit before it, and nothing is cancelled
    waited = "timeout graceful shutdown exceeded" in \
        (Path(sidecar.uds).parent / "sidecar.log").read_text()
    assert waited == (len(signals) == 1)
    again = start_sidecar(Path(sidecar.uds).parent)  # same database and socket path: reusable
    assert again.stop() == 0


@pytest.mark.timeout(90)
def test_sigterm_stops_the_sidecar_while_another_process_holds_the_database_locked(
    sidecar: Sidecar,
) -> None:
    """Publishers that time out and post again while the database is locked by another
    process: SIGTERM used to wait for each queued write's 5 s busy wait, then for the store's
    close (minutes). Now the sidecar ends within the grace period and the store's close
    deadline, and what was accepted before the lock is still there at the next start."""
    db = Path(sidecar.uds).parent / "state.db"
    snap = {"schema_version": 1, "run_id": "r", "rank": 0, "step": 1, "wall_time": 1e9,
            "params": health(1)}
    with sidecar.client() as c:
        assert c.post("/v1/snapshots", json=snap).status_code == 201
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        def impatient(step: int) -> None:  # gives up after the Publisher's default 2 s
            with contextlib.suppress(httpx.HTTPError), sidecar.client() as c:
                c.post("/v1/snapshots", json={**snap, "step": step}, timeout=2.0)

        posters = [threading.Thread(target=impatient, args=(s,), daemon=True)
                   for s in range(2, 22)]
        for t in posters:
            t.start()
        time.sleep(1.0)  # the writes are waiting for the database
        sidecar.proc.send_signal(signal.SIGTERM)
        # a hang guard: the grace and the close deadline, plus 3 s for the interpreter to exit
        status = sidecar.proc.wait(timeout=SHUTDOWN_GRACE_S + CLOSE_WAIT_S + 3.0)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert status == 0
    again = start_sidecar(Path(sidecar.uds).parent)
    with again.client() as c:
        assert c.get("/v1/optimizer").json()["ranks"][0]["step"] == 1
    assert again.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("option", "value", "message"), [
    ("--rotation-hold", "-5", "--rotation-hold must be in [0, --series-ttl=900.0) seconds"),
    ("--max-body-bytes", "10", "--max-body-bytes must be >= 1024, got 10"),
])
def test_sidecar_cli_refuses_a_bad_setting_by_its_option(tmp_path: Path, option: str, value: str,
                                                        message: str) -> None:
    # the messages named the settings' fields (rotation_hold_s, series_ttl_s), not the options
    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_hex(16))
    token_file.chmod(0o600)
    db = tmp_path / "state.db"
    cmd = [sys.executable, "-m", "orthoshard.cli", "sidecar", "--token-file", str(token_file),
           "--db", str(db), "--port", str(free_port()), option, value]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not db.exists()  # refused before touching the store


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["missing directory", "not a database", "locked"])
def test_sidecar_cli_names_a_database_it_cannot_use(tmp_path: Path, where: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_hex(16))
    token_file.chmod(0o600)
    db = tmp_path / "absent" / "state.db"
    holder = None
    if where == "not a database":
        db = tmp_path / "notes.txt"
        db.write_text("not a database")
    elif where == "locked":  # another process's write transaction (a traceback, exit 1)
        from service.store import Store

        db = tmp_path / "state.db"
        Store(str(db), history_max_rows=10).close()  # a sidecar's database
        holder = sqlite3.connect(db)
        holder.execute("BEGIN IMMEDIATE")
    cmd = [sys.executable, "-m", "orthoshard.cli", "sidecar", "--token-file", str(token_file),
           "--db", str(db), "--port", str(free_port())]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
    assert proc.returncode == 2, proc.stderr
    if where == "locked":
        assert f"cannot open {db}: " in proc.stderr and "holds it locked" in proc.stderr
    else:
        assert f"cannot use {db} as the history database" in proc.stderr
    assert "Traceback" not in proc.stderr


def sidecar_cli(tmp: Path, *args: str, file_size_limit: int | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Run ``orthoshard sidecar *args`` with a fresh token file until it exits (for the
    start-up refusals, which must exit 2 with a message, not a traceback)."""
    token_file = tmp / "cli-token"
    token_file.write_text(secrets.token_hex(16))
    token_file.chmod(0o600)
    cmd = [sys.executable, "-m", "orthoshard.cli", "sidecar", "--token-file", str(token_file),
           *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50,
                          preexec_fn=_file_size_limit(file_size_limit))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.timeout(60)
def test_a_second_sidecar_leaves_the_running_ones_socket_and_database_alone(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    # Started by mistake with the first one's port and socket: it used to delete the live
    # socket on its way out (exit 3, a traceback), leaving the first one unreachable there.
    second_db = tmp_path / "second.db"
    same_port = sidecar_cli(tmp_path, "--port", str(sidecar.port), "--uds", sidecar.uds,
                            "--db", str(second_db))  # fmt: skip
    assert same_port.returncode == 2, same_port.stderr
    assert f"cannot listen on 127.0.0.1:{sidecar.port} (Address already in use)" in \
        same_port.stderr and "another --port" in same_port.stderr
    same_uds = sidecar_cli(tmp_path, "--port", str(free_port()), "--uds", sidecar.uds,
                           "--db", str(tmp_path / "state.db"))  # fmt: skip
    assert same_uds.returncode == 2, same_uds.stderr
    assert f"--uds {sidecar.uds} is in use" in same_uds.stderr
    assert not second_db.exists()  # refused before any database was opened
    # its own port and socket, the first one's --db: both ran, each writing its own counts
    # over the other's, and the snapshot counts went back at the next start
    same_db = sidecar_cli(tmp_path, "--port", str(free_port()), "--uds",
                          str(tmp_path / "second.sock"), "--db", str(tmp_path / "state.db"))
    assert same_db.returncode == 2, same_db.stderr
    assert f"another sidecar (process {sidecar.proc.pid}) is using this database (locked in " \
        f"{tmp_path / 'state.db'}.lock): stop that sidecar, or pass another --db" in same_db.stderr
    with sidecar.client(via_uds=True) as unix, sidecar.client() as tcp:
        assert unix.get("/healthz").status_code == tcp.get("/healthz").status_code == 200
        assert unix.post("/v1/snapshots", json={
            "schema_version": 1, "run_id": "r", "rank": 0, "step": 1, "wall_time": 1.7e9,
            "params": {"w": {"orthogonality_error": 0.1}}}).status_code == 201  # fmt: skip
    assert sidecar.stop() == 0 and not os.path.exists(sidecar.uds)  # it removes its own


@pytest.mark.timeout(60)
def test_a_stale_socket_file_is_replaced_and_a_file_that_is_no_socket_is_not(
    tmp_path: Path,
) -> None:
    uds = tmp_path / "sidecar.sock"  # where start_sidecar puts it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(uds))  # left behind by a sidecar that was SIGKILLed: nobody listens
    car = start_sidecar(tmp_path)
    assert car.stop() == 0 and not uds.exists()
    uds.write_text("not a socket")
    proc = sidecar_cli(tmp_path, "--port", str(free_port()), "--uds", str(uds),
                       "--db", str(tmp_path / "state.db"))  # fmt: skip
    assert proc.returncode == 2 and f"--uds {uds} exists and is not a socket" in proc.stderr
    assert uds.read_text() == "not a socket"


def _read_only_file(path: Path, undo: contextlib.ExitStack) -> str:
    """Make the file ``path`` unwritable for this process and return the ``--db`` argument
    naming it. chmod does not bind root, so root makes the file immutable (``chattr +i``); where
    the filesystem cannot (or chattr is absent), root opens the same file read-only through a
    SQLite URI, which fails the sidecar's start-up write the same way."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        undo.callback(path.chmod, 0o644)
        return str(path)
    chattr = shutil.which("chattr")
    if chattr is not None and subprocess.run([chattr, "+i", str(path)],
                                             capture_output=True).returncode == 0:
        undo.callback(subprocess.run, [chattr, "-i", str(path)], check=True)
        return str(path)
    return f"file:{path}?mode=ro"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["read-only open", "read-only file"])
def test_sidecar_cli_refuses_a_database_it_cannot_write(tmp_path: Path, how: str) -> None:
    # In WAL mode with its tables in place, such a file needed no write to open: the sidecar
    # started, then answered 500 to every ingest.
    db = tmp_path / "state.db"
    Store(str(db), history_max_rows=10).close()
    arg = f"file:{db}?mode=ro"  # SQLite's read-only open, what it falls back to for such files
    with contextlib.ExitStack() as undo:
        if how == "read-only file":
            arg = _read_only_file(db, undo)
        proc = sidecar_cli(tmp_path, "--db", arg, "--port", str(free_port()))
    assert proc.returncode == 2, proc.stderr
    # refused by the store before SQLite opens it (a file it cannot write), or by SQLite (a
    # read-only open, which the store cannot see)
    assert f"cannot use {arg} as the history database (this user cannot write {arg})" in \
        proc.stderr if arg == str(db) else f"cannot use {arg} as the history database " \
        "(attempt to write a readonly database)" in proc.stderr
    # SQLite's switch to WAL on a file it could not write left -wal and -shm files as
    # read-only as the file, which failed the next start after the file was made writable
    if arg == str(db):
        assert sorted(f.name for f in tmp_path.glob("state.db*")) == ["state.db",
                                                                     "state.db.lock"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("level", ["info", "warning"])  # --log-level warning hid the line
def test_the_sidecar_logs_where_it_listens_the_port_it_was_given_included(
        tmp_path: Path, level: str) -> None:
    # with --port 0 the kernel picks the port, and nothing said which: only `ss` could tell
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    uds = tmp_path / "s.sock"
    cmd = [sys.executable, "-m", "orthoshard.cli", "sidecar", "--token-file", str(token_file),
           "--db", str(tmp_path / "state.db"), "--port", "0", "--uds", str(uds),
           "--log-level", level]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the first line it writes
        found = re.search(r"sidecar listening on http://127\.0\.0\.1:(\d+) and unix socket (\S+)",
                          line)
        assert found is not None and found.group(2) == str(uds), line
        port = int(found.group(1))
        assert port > 0
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


@pytest.mark.timeout(60)
def test_a_sidecar_that_cannot_write_its_lock_file_says_so_and_exits_2(tmp_path: Path) -> None:
    # a full disk (or a quota) lets the lock file be created but not its one line: the write's
    # OSError came out as a traceback and exit 1
    db = tmp_path / "state.db"
    proc = sidecar_cli(tmp_path, "--db", str(db), "--port", str(free_port()), file_size_limit=0)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write its lock file {db}.lock" in proc.stderr


def _snapshot(step: int, params: int = 100) -> dict:
    return {"schema_version": 1, "run_id": "r", "rank": 0, "step": step,
            "wall_time": 1.7e9 + step, "params": {
                f"layers.{i}.w": {"orthogonality_error": 0.001 * step} for i in range(params)}}


@pytest.mark.timeout(120)
def test_a_write_the_os_refuses_is_a_503_logged_once_and_loses_nothing_acknowledged(
        tmp_path: Path) -> None:
    # A write refused otherwise than by ENOSPC (a quota, a file-size limit, EIO) is SQLite's
    # IOERR, not FULL: every post answered 500 and logged a traceback
    car = start_sidecar(tmp_path, file_size_limit=300_000)
    acked: list[int] = []
    refused: list[httpx.Response] = []
    try:
        with car.client() as c:
            # ~25 KB of WAL a snapshot: the limit comes by step ~15. A checkpoint that starts
            # the WAL over makes room again, so later posts may be taken: each step is sent
            # once, and history must then hold exactly the answered ones
            for step in range(1, 400):
                r = c.post("/v1/snapshots", json=_snapshot(step))
                assert r.status_code in (201, 503), r.text
                if r.status_code == 201:
                    acked.append(step)
                else:
                    refused.append(r)
                if len(refused) >= 3:
                    break
    finally:
        assert car.stop() == 0
    assert acked and refused, "the limit was not reached, or nothing was stored below it"
    for r in refused:
        assert r.json()["type"] == "urn:orthoshard:problem:storage-unavailable"
        assert "disk I/O error (SQLITE_IOERR" in r.json()["detail"]
        assert r.headers["retry-after"] == "30"  # an operator's matter, as a full disk
    log = (tmp_path / "sidecar.log").read_text()
    assert "Traceback" not in log and log.count("storage unavailable") == 1, log
    car = start_sidecar(tmp_path)  # the limit lifted: every answered 201 is there
    try:
        with car.client() as c:
            points = c.get("/v1/params/layers.0.w/history").raise_for_status().json()["points"]
            assert [p["step"] for p in points] == acked
            assert c.post("/v1/snapshots", json=_snapshot(acked[-1] + 1)).status_code == 201
    finally:
        car.stop()


def _closed_by_peer(conn: socket.socket, within_s: float) -> bool:
    """Whether the other end closes ``conn`` within ``within_s`` seconds."""
    conn.settimeout(within_s)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.timeout(60)
def test_a_connection_that_never_sends_whole_headers_is_closed(sidecar: Sidecar) -> None:
    # uvicorn timed a connection only between requests: one that sent nothing, or half a
    # request line, or a byte now and then, was held for good, and enough of them (no token
    # needed) used up the sidecar's file descriptors
    idle = socket.create_connection(("127.0.0.1", sidecar.port))
    half = socket.create_connection(("127.0.0.1", sidecar.port))
    half.sendall(b"GET /healthz HTTP/1.1\r\n")
    unix = socket.socket(socket.AF_UNIX)
    unix.connect(sidecar.uds)
    # a whole request whose body stalls is the app's to wait for, not this timer's
    body = socket.create_connection(("127.0.0.1", sidecar.port))
    body.sendall(f"POST /v1/snapshots HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer "
                 f"{sidecar.token}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 100\r\n\r\n{{".encode())
    with idle, half, unix, body:
        with sidecar.client() as c:  # a keep-alive client's request meanwhile: answered
            assert c.get("/healthz").status_code == 200
        # the timer runs from the connection's opening; 5 s spare for a loaded machine
        for conn in (idle, half, unix):
            assert _closed_by_peer(conn, HEADER_TIMEOUT_S + 5.0)
        assert not _closed_by_peer(body, 1.0)
