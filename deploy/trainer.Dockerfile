# A training node: torch + the project, started under torchrun (docker-compose.yml passes the
# torchrun options and `-m orthoshard.train ...`).
#   docker build -f deploy/trainer.Dockerfile -t orthoshard-trainer .
# GPU: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (see
# docker-compose.gpu.yml); the default is the CPU wheel the project is tested with.
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY optim ./optim
COPY sharding ./sharding
COPY service ./service
COPY orthoshard ./orthoshard
COPY bench ./bench
# Editable, so files next to the packages (bench/, shipped data) resolve as in a checkout.
RUN pip install --no-cache-dir -e . \
 && python -c "import torch, optim, sharding, service, orthoshard.train, orthoshard._torchrun"
# torchrun, exiting 128 + the signal that stops it (orthoshard/_torchrun.py)
ENTRYPOINT ["python", "-m", "orthoshard._torchrun"]
