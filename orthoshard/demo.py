"""``orthoshard demo``: the whole product on one machine, in one command.

1. Starts a health sidecar (``orthoshard sidecar``) on 127.0.0.1 with a fresh token.
2. Runs ``torchrun --standalone --nproc-per-node P -m orthoshard.train``: a small GPT under
   FSDP2 with ``OwnerSharding``; every rank publishes the health of the matrices it owns.
3. Reads the sidecar's state API back, prints the health table and the URLs, and writes
   ``OUT/summary.json`` and ``OUT/health.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from orthoshard.report import HEALTH_LOG

__all__ = ["add_arguments", "run"]

_TABLE_METRICS = ("orthogonality_error", "update_rms", "softening", "eigengap_ratio_L",
                  "rotation_degrees_L_k1", "rotation_degrees_L_k8", "nonfinite_skips")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--nproc", type=int, default=2, help="trainer processes (default 2)")
    p.add_argument("--optimizer", choices=("muon", "normuon", "soap"), default="muon",
                   help="hidden-matrix optimizer (default: Muon, softened by a schedule)")
    p.add_argument("--kl-shampoo", action="store_true", help="SOAP with KL-Shampoo factors")
    p.add_argument("--spike-at", type=int, default=None,
                   help="inject a rank-1 gradient spike at this step (counted from 1, as "
                        "the logs, the plot and the sidecar number steps)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts")
    p.add_argument("--sidecar-port", type=int, default=0, help="0: a free port")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step")
    p.add_argument("--rotation-hold", type=float, default=None,
                   help="the sidecar's --rotation-hold (seconds; default: the sidecar's 30 s)")
    p.add_argument("--linger", type=float, default=0.0,
                   help="keep the sidecar up this many seconds after training (-1: until Ctrl-C)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SidecarError(RuntimeError):
    """The demo's sidecar did not start (the sidecar printed why)."""


class Sidecar:
    """A sidecar subprocess on 127.0.0.1 with a fresh token in ``OUT/sidecar.token``."""

    def __init__(self, out: Path, port: int, rotation_hold: float | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = out / "sidecar.token"
        # readable by its owner alone from the start (a umask-made file is world-readable
        # until a chmod after the write)
        self.token_file.unlink(missing_ok=True)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self.db = out / "sidecar.db"
        cmd = [sys.executable, "-m", "orthoshard.cli", "sidecar", "--port", str(self.port),
               "--token-file", str(self.token_file), "--db", str(self.db),
               "--log-level", "warning"]
        if rotation_hold is not None:
            cmd += ["--rotation-hold", str(rotation_hold)]
        # this checkout's orthoshard in the child too (bench/sidecar.py runs from anywhere,
        # where `-m orthoshard.cli` found another install, or none)
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
        self.client = httpx.Client(base_url=self.url, timeout=5.0, headers={
            "Authorization": f"Bearer {self.token_file.read_text()}"})
        try:
            # A session of its own, as torchrun's: a terminal's Ctrl-C stopped it at once,
            # while the ranks still finished their step and published it ("sidecar
            # unreachable", their last snapshots lost). The demo stops it, after them; a
            # Ctrl-C from here on reaches the stop below (what came between the start and
            # this block left it running, out of the terminal's reach, holding --out)
            self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": path},
                                         start_new_session=True)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float = 30.0) -> None:
        """Until THIS sidecar serves: another process answering /healthz on the port (a sidecar
        already there, which makes ours exit) must not be taken for it, so the token it was
        started with must open the state API too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SidecarError(f"the sidecar exited with code {self.proc.returncode} "
                                   f"(its message is above)")
            try:
                if self.client.get("/healthz").status_code == 200 and \
                        self.client.get("/v1/optimizer").status_code == 200 and \
                        self.proc.poll() is None:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SidecarError(f"the sidecar did not answer on {self.url} with its token in "
                           f"{timeout} s")

    def params(self) -> dict[str, dict[str, Any]]:
        """Latest metrics of every parameter, through the paginated state API."""
        out: dict[str, dict[str, Any]] = {}
        cursor = None
        while True:
            page = self.client.get("/v1/params", params={"limit": 500, **(
                {"cursor": cursor} if cursor else {})}).raise_for_status().json()
            for item in page["items"]:
                out[item["name"]] = self.client.get(
                    f"/v1/params/{item['name']}").raise_for_status().json()
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def stop(self) -> None:
        self.client.close()
        if not hasattr(self, "proc"):  # stopped before it started
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _train_argv(args: argparse.Namespace, url: str, token_file: Path) -> list[str]:
    """``orthoshard.train``'s arguments for this demo run."""
    argv = ["--steps", str(args.steps), "--optimizer", args.optimizer, "--out", str(args.out),
            "--sidecar-url", url, "--token-file", str(token_file),
            "--step-delay", str(args.step_delay)]
    if args.kl_shampoo:
        argv.append("--kl-shampoo")
    if args.spike_at is not None:
        argv += ["--spike-at", str(args.spike_at)]
    if args.checkpoint_dir is not None:
        argv += ["--checkpoint-dir", str(args.checkpoint_dir),
                 "--checkpoint-every", str(args.checkpoint_every)]
        if args.resume or args.max_restarts:  # a restarted group resumes from the checkpoint
            argv.append("--resume")
    return argv


# How long torchrun may take to stop its workers after a SIGTERM before it is killed: longer
# than the 30 s torchrun gives its ranks to finish their step and checkpoint it.
_TORCHRUN_STOP_S = 45.0


def _torchrun(args: argparse.Namespace, sidecar: Sidecar) -> int:
    cmd = [sys.executable, "-m", "orthoshard._torchrun", "--standalone",
           f"--nproc-per-node={args.nproc}", f"--max-restarts={args.max_restarts}",
           "-m", "orthoshard.train", *_train_argv(args, sidecar.url, sidecar.token_file)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           # a store of its own for each restart (--max-restarts): see orthoshard.train
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # A session of its own: a terminal's Ctrl-C reaches the demo alone, which stops torchrun
    # (and torchrun its ranks) once, instead of every process of the group at the same instant
    # (each rank and torchrun printed a traceback of its own, and torchrun's exit 1 read as a
    # failed run)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:  # SIGTERM (as SystemExit) or Ctrl-C: stop the trainers, not orphan them
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # torchrun stops its workers, then exits
            try:
                proc.wait(timeout=_TORCHRUN_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def _torchrun_outcome(code: int) -> str:
    """What torchrun's exit status ``code`` (not 0) says: a signal sent to torchrun itself
    (``orthoshard._torchrun`` exits 128 + its number; the ranks stopped after their step, as
    on SIGTERM), or a failure (1: a rank failed, or torchrun did)."""
    if code in (128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGHUP):
        return (f"training stopped: torchrun got {signal.Signals(code - 128).name} "
                f"(exit {code})")
    return f"training failed (torchrun exit {code})"


def _fresh_outputs(out: Path, resume: bool) -> None:
    """Create ``out`` and prove it writable; remove a previous run's results (a run that fails
    must not leave the last run's summary looking like its own, and a resume at fewer ranks
    must not read the ranks that are gone) and, unless resuming, its logs too."""
    from orthoshard.arguments import probe_writable

    out.mkdir(parents=True, exist_ok=True)
    probe_writable(out)
    ours = _RESULTS if resume else _RESULTS + "|" + _LOGS
    for f in out.iterdir():
        if re.fullmatch(ours, f.name) and not f.is_dir():
            f.unlink()


# the files a demo run writes in --out, as full-name patterns: only these are cleared, so a
# user's own files there (ranking.json, sidecar.db.bak) stay
_RESULTS = r"rank\d+\.json|summary\.json|health\.png|final_params\.pt"
_LOGS = rf"{HEALTH_LOG}|loss\.jsonl|sidecar\.db(-wal|-shm|-journal)?"


# Ranks the local demo starts at most: each is a Python process holding torch (~300 MB) on this
# one machine; more belong to torchrun across nodes.
MAX_LOCAL_RANKS = 64


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What makes these arguments unusable, before anything starts (None: they are fine): the
    demo's own, then those it hands to ``orthoshard.train`` (checked there, once for both)."""
    from orthoshard.arguments import MAX_SLEEP_S, argument_problem, restart_problem
    from service.settings import DEFAULT_SERIES_TTL_S

    if args.steps < 1 or args.nproc < 1:
        return "--steps and --nproc must be >= 1"
    if args.nproc > MAX_LOCAL_RANKS:
        return (f"--nproc {args.nproc}: the local demo runs every rank on this machine, at most "
                f"{MAX_LOCAL_RANKS}; for more ranks run orthoshard.train under torchrun on each "
                f"node (docs/deploy.md)")
    if args.max_restarts < 0:
        return "--max-restarts must be >= 0"
    if not (0 <= args.linger <= MAX_SLEEP_S or args.linger == -1):
        return (f"--linger must be >= 0 seconds and at most {MAX_SLEEP_S:g}, or -1 (until "
                f"Ctrl-C), got {args.linger}")
    if not 0 <= args.sidecar_port <= 65535:
        return f"--sidecar-port must be a TCP port (0: a free one), got {args.sidecar_port}"
    if args.rotation_hold is not None and \
            not 0 <= args.rotation_hold < DEFAULT_SERIES_TTL_S:
        # (the sidecar refuses a hold of its series TTL or more, which the demo leaves at the
        # default: a refusal there came after --out had been cleared)
        return (f"--rotation-hold must be >= 0 seconds and under the sidecar's series TTL, "
                f"{DEFAULT_SERIES_TTL_S:g} s, got {args.rotation_hold}")
    problem = restart_problem(args.checkpoint_dir, resume=args.resume,
                              restarts=bool(args.max_restarts)) or argument_problem(args)
    if problem is None and args.resume:
        problem = _resume_problem(args.checkpoint_dir, args.steps, args.optimizer,
                                  args.spike_at, args.kl_shampoo)
    return problem


def _resumable(directory: Path | None, steps: int) -> str:
    """Where a failed or stopped run can go on from: its checkpoint directory's ``LATEST``
    (the ranks checkpoint the step they stop after on SIGTERM, a signal to torchrun too),
    unless its files show it cannot be loaded (a resume that failed on it) or it is of the
    last step (``--resume`` refuses it: what failed came after training), as text to append to
    the failure; empty without one."""
    from orthoshard.checkpoints import Checkpoints, checkpoint_damage, checkpoint_step

    if directory is None:
        return ""
    try:
        latest = Checkpoints(directory).latest()
    except OSError:
        return ""
    if latest is None:
        return ""
    damage = checkpoint_damage(latest)
    if damage is not None:  # what a resume failed to load: no advice to try it again
        return (f"; its last checkpoint, {latest}, cannot be resumed: {damage} (the ranks' "
                f"messages above say where to point LATEST)")
    done = checkpoint_step(latest)
    if done is not None and done >= steps:
        return (f"; its last checkpoint, {latest}, is of step {done}: training reached "
                f"--steps {steps}, and what failed came after it")
    return f"; its last checkpoint is {latest}: --resume continues from it"


def _resume_problem(directory: Path, steps: int, optimizer: str,
                    spike_at: int | None = None, kl_shampoo: bool = False) -> str | None:
    """What stops ``--resume`` from ``directory`` before any rank starts (None: nothing): a
    LATEST naming no checkpoint, one at or past ``--steps`` (nothing left to train), one past
    ``--spike-at`` (the spike would never happen, yet be reported), or one another
    ``--optimizer`` saved, or SOAP with the other ``--kl-shampoo`` setting. A missing LATEST
    is fine: the run starts from step 0 and writes one."""
    from orthoshard.checkpoints import (
        Checkpoints,
        checkpoint_step,
        optimizer_mismatch,
        spike_problem,
    )

    try:
        latest = Checkpoints(directory).latest()
    except OSError as exc:  # FileNotFoundError among them
        return f"--resume: {exc}"
    if latest is None:
        return None
    done = checkpoint_step(latest)
    if done is not None and done >= steps:
        return (f"--resume: the checkpoint {latest} is at step {done}, not before --steps "
                f"{steps}: nothing is left to train; pass a larger --steps")
    return spike_problem(latest, spike_at) or optimizer_mismatch(latest, optimizer, kl_shampoo)


def run(args: argparse.Namespace) -> int:
    problem = _argument_problem(args)
    if problem is not None:
        print(f"orthoshard demo: {problem}", file=sys.stderr)
        return 2
    # SIGTERM (kill, timeout, a CI runner) and SIGHUP (the terminal closed; torchrun runs in a
    # session of its own, which the hang-up does not reach) end the demo as Ctrl-C does:
    # through the finally clauses that stop the trainers and the sidecar, which would
    # otherwise run on orphaned
    previous = {sig: signal.signal(sig, _exit_on_sigterm)
                for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C: the trainers and the sidecar are stopped by now
        print("\northoshard demo: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    from orthoshard import report

    # every check that can refuse the run comes before _outputs_problem, which deletes the
    # last run's results and logs from --out
    problem = _port_problem(args) or _checkpoints_problem(args) or _outputs_problem(args)
    if problem is not None:
        print(f"orthoshard demo: {problem}", file=sys.stderr)
        return 2
    started = time.time()
    try:
        sidecar = Sidecar(args.out, args.sidecar_port, args.rotation_hold)
    except SidecarError as exc:
        print(f"orthoshard demo: {exc}", file=sys.stderr)
        return 2
    code = 0
    try:
        print(f"sidecar: {sidecar.url}  (metrics: {sidecar.url}/metrics)", flush=True)
        code = _torchrun(args, sidecar)
        if code != 0:
            print(f"orthoshard demo: {_torchrun_outcome(code)}"
                  f"{_resumable(args.checkpoint_dir, args.steps)}", file=sys.stderr)
            return code
        time.sleep(0.5)  # the publishers flushed on close; let the last POSTs land
        try:
            served = sidecar.params()
        except httpx.HTTPError as exc:
            # the run's logs and reports are on disk: the summary and the plot come from
            # them, without what the sidecar would have served
            stopped = sidecar.proc.poll()
            print(f"orthoshard demo: the sidecar did not answer ({exc}"
                  + (f"; it exited with code {stopped}" if stopped is not None else "")
                  + "): summary.json lacks what it serves", file=sys.stderr)
            served, code = {}, 1
        summary = report.write_summary(args, served, time.time() - started)
        report.plot(args.out, args.spike_at)
        report.print_table(served, _TABLE_METRICS)
        report.print_footer(args, summary, sidecar.url)
        if code == 0:
            _linger(args.linger)
    finally:
        sidecar.stop()
    return code


def _port_problem(args: argparse.Namespace) -> str | None:
    """Why the sidecar cannot listen on ``--sidecar-port`` (None: it can, or it is 0)."""
    if args.sidecar_port:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                s.bind(("127.0.0.1", args.sidecar_port))
            except OSError as exc:
                return (f"--sidecar-port {args.sidecar_port} is taken on 127.0.0.1 "
                        f"({exc.strerror or exc}): pass another, or 0 for a free one")
    return None


def _checkpoints_problem(args: argparse.Namespace) -> str | None:
    """Why the ranks could not write checkpoints to ``--checkpoint-dir`` (None: they can, or
    the run writes none): as each rank checks, but once, and before anything starts."""
    if args.checkpoint_dir is None:
        return None
    from orthoshard.checkpoints import Checkpoints, writes_directory

    if writes_directory(args.checkpoint_dir, resume=args.resume, every=args.checkpoint_every):
        try:
            Checkpoints(args.checkpoint_dir).check_writable()
        except OSError as exc:
            return str(exc)
    return None


def _outputs_problem(args: argparse.Namespace) -> str | None:
    """Prepare ``--out`` (:func:`_fresh_outputs`) under its database's lock; what stops the
    demo (None: nothing). A demo still serving from the same ``--out`` (``--linger``) had its
    results, logs, live database and token deleted by a second one, which then stopped, its
    sidecar refused by the first's lock."""
    from service.dbfile import database_held
    from service.records import DatabaseInUse

    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with database_held(str(args.out / "sidecar.db")):
            _fresh_outputs(args.out, args.resume)
    except DatabaseInUse as exc:
        return (f"--out {args.out} is in use: {exc}. Stop that demo (Ctrl-C, or the end of "
                f"its --linger), or pass another --out")
    except (OSError, sqlite3.OperationalError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return f"cannot use --out {args.out}: {reason}"
    return None


def _linger(seconds: float) -> None:
    if seconds == 0:
        return
    print("sidecar still serving" + (" until Ctrl-C" if seconds < 0 else f" for {seconds} s"))
    with contextlib.suppress(KeyboardInterrupt):
        time.sleep(seconds if seconds > 0 else 10**9)
