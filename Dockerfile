# syntax=docker/dockerfile:1
# One image with the dsrelay services and the CLI: dsrelay-registry, dsrelay-processor and
# dsrctl. docker-compose.yml builds it for every dsrelay service.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# protox compiles the protocol in build.rs, so no protoc is needed; the caches keep
# rebuilds incremental.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dsrelay-registry -p dsrelay-processor -p dsrctl \
    && mkdir -p /out \
    && cp target/release/dsrelay-registry target/release/dsrelay-processor target/release/dsrctl /out/

FROM debian:bookworm-slim
# curl only for the compose health checks against the admin port (/healthz).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# The PKI folders are owned by the service user so that a new named volume mounted there
# is writable (the compose `pki` service writes all three).
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/dsrelay dsrelay \
    && mkdir /pki /pki-registry /pki-registry-retailer /pki-processor \
    && chown dsrelay /pki /pki-registry /pki-registry-retailer /pki-processor
COPY --from=build /out/ /usr/local/bin/
USER dsrelay
WORKDIR /var/lib/dsrelay
# gRPC (registry, processor) and the admin port (/metrics, /healthz).
EXPOSE 50051 50061 9464
CMD ["dsrctl", "--help"]
