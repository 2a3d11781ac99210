# The health sidecar: service/ and the console script, no torch (docs/service.md).
#   docker build -f deploy/sidecar.Dockerfile -t orthoshard-sidecar .
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY deploy/sidecar-requirements.txt /tmp/sidecar-requirements.txt
RUN pip install --no-cache-dir -r /tmp/sidecar-requirements.txt
COPY pyproject.toml README.md ./
COPY service ./service
COPY orthoshard ./orthoshard
# --no-deps: pyproject lists torch for the trainer; the sidecar never imports it. The check
# fails the build if torch slipped in through a dependency.
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && orthoshard sidecar --help >/dev/null \
 && mkdir -p /var/lib/orthoshard
EXPOSE 9400
VOLUME /var/lib/orthoshard
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=2)"
# Runs as root in the container because compose bind-mounts file secrets with the host file's
# owner and mode (uid/gid/mode are ignored outside swarm); see docs/deploy.md to run non-root.
ENTRYPOINT ["orthoshard", "sidecar"]
CMD ["--host=0.0.0.0", "--port=9400", "--token-file=/run/secrets/orthoshard_token", \
     "--db=/var/lib/orthoshard/sidecar.db"]
