# The PDP's container image: the wheel built in one stage, installed in a slim one.
#   docker build -t policy-engine:0.1.0 .
# The build stage runs the command tests/packaging builds and installs from (WHEEL_COMMAND in
# tests/packaging/artifacts.py): the project's wheel, its gRPC stubs generated from protos/ by
# the build, and the wheels of the server's dependencies and of the `tracing` extra
# (OpenTelemetry: PDP_TRACING__ENABLED=true works in this image; while tracing is off none of
# it is imported). The runtime stage installs them with no index (no compiler, no network, no
# build tools in the image) and runs as a user without a home, on a read-only root file system
# (deploy/deployment.yaml). Needs BuildKit (the default builder of Docker 23 and later) for the
# runtime stage's bind mount.

FROM python:3.11-slim AS build
WORKDIR /src
# .dockerignore lets in only what the build reads.
COPY . .
RUN pip wheel --wheel-dir /wheels ".[server,tracing]"

FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 pdp \
    && useradd --system --uid 10001 --gid pdp --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pdp
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "policy-engine[server,tracing]"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PDP_ADDRESS=[::]:50051 \
    PDP_POLICY_DIR=/etc/pdp/policies
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 50052 9464
ENTRYPOINT ["pdp"]
CMD ["serve"]
