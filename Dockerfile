# The operator image: `lorakube operator` on Kopf and the Kubernetes client, no torch.
#
#   docker build -t lorakube-operator:dev .        # from the repository root
#
# The trainer runs in its own image (trainer_image/Dockerfile); the operator only needs the
# `lorakube` package and the `operator` extra pinned in pyproject.toml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY api/lorakube_api/ api/lorakube_api/
COPY operator/lorakube/ operator/lorakube/
# pyproject names a readme; the operator needs none. The other package folders are absent on purpose.
RUN touch README.md \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip setuptools wheel \
 && /opt/venv/bin/pip install ".[operator]" \
 && /opt/venv/bin/python -c "import lorakube.handlers, lorakube.cli, lorakube_api.contract" \
 && if /opt/venv/bin/python -c "import lorakube_trainer" 2>/dev/null; then echo "the trainer leaked into the operator image" >&2; exit 1; fi \
 && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch leaked into the operator image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/venv /opt/venv
# Non-root, no home, no shell login: Pod Security "restricted" and nothing to write but /tmp.
RUN useradd --uid 10002 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin lorakube
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10002
EXPOSE 8080
ENTRYPOINT ["lorakube", "operator"]
# /metrics, /healthz and /readyz on 0.0.0.0:8080 (--http-address, the default).
CMD ["--all-namespaces"]
