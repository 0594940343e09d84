# frozen-bn serving image: bn-serve (KServe V2 / Open Inference Protocol) on onnxruntime, CPU.
#
#   docker build -t frozen-bn .
#   docker run --rm -p 8000:8000 frozen-bn                          # serves the built-in demo model "digits"
#   docker run --rm -p 8000:8000 -v $PWD/models:/models:ro frozen-bn  # serves your model repository
#
# Every bn-serve setting is an environment variable with the prefix BN_SERVE_ (BN_SERVE_PORT, ...).
# BASE must be a Debian-like image with Python 3.11+ as `python3` and its venv module: the default, or the
# registry-free bookworm image that scripts/container-tools.sh makes. Dockerfile.cuda is the GPU variant.
ARG BASE=python:3.11-slim

# ---- builder: the wheel, a virtual environment with it and its dependencies, and the demo model ----
FROM ${BASE} AS builder
# Index settings for pip, passed through from the host when its index is not the default one.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT=60
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# The same path in both stages, so the venv's interpreter link stays valid when it is copied over.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone: this layer stays cached while only the code changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md ./
COPY bn_export ./bn_export
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-deps /tmp/wheels/*.whl

# The demo model, fitted and exported at build time so that a bare `docker run` serves at once.
# The export writes owner-only files (atomically, via a temporary file); the server runs as another user.
RUN bn-export fit bn_export/demo_data/digits.npz --targets bn_export/demo_data/digits.npz \
        --head linear --loss cross-entropy --stats population --epochs 3 --seed 0 --out /tmp/digits.ckpt.npz \
    && bn-export export /tmp/digits.ckpt.npz --with-head --out /models/digits/1/model.onnx \
    && bn-export verify /models/digits/1/model.onnx \
    && chmod -R a+rX /models

# pip is not needed to serve; nothing in the runtime image should install packages.
RUN pip uninstall --yes pip

# ---- runtime: the interpreter, the venv and the models, run as an unprivileged user ----
FROM ${BASE} AS runtime
# A fixed numeric id, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --system --gid 10001 bnserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin bnserve
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BN_SERVE_HOST=0.0.0.0 \
    BN_SERVE_PORT=8000 \
    BN_SERVE_GRPC_PORT=8001 \
    BN_SERVE_MODEL_REPOSITORY=/models
USER 10001:10001
# REST, then the gRPC inference service (inference.GRPCInferenceService, grpc.health.v1.Health).
EXPOSE 8000
EXPOSE 8001
# Mount a model repository here (read-only is enough); the demo model is its default content.
VOLUME ["/models"]
# Ready means every model is loaded; urllib raises on any non-2xx answer, so the exit status follows.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('BN_SERVE_PORT', '8000'), timeout=2)"
ENTRYPOINT ["bn-serve"]
