# syntax=docker/dockerfile:1
#
# The stagesync container image: a Rust builder stage, then a small Debian runtime with only
# the binary, CA certificates and a non-root user.
#
#   docker build -t stagesync:0.1.0 .
#   docker run --rm -v "$PWD/stagesync.toml:/etc/stagesync/stagesync.toml:ro" \
#       -e PROD_URI=… -e STAGING_URI=… -e STAGESYNC_MASK_KEY=… -p 9464:9464 stagesync:0.1.0
#
# crates/stagesync/tests/deploy.rs checks this file (stages, user, entrypoint, build command,
# Rust version against the rust-version of the workspace and of Cargo.lock's dependencies,
# copied paths, binary path); see deploy/README.md.

# ---- builder --------------------------------------------------------------------------------
# At least the workspace's `rust-version` (1.89, which the locked dependencies need); 1.95 is
# the toolchain the project's CI builds and tests with.
# Bookworm, like the runtime stage: the binary links against this stage's glibc.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# Cargo loads the whole workspace, so every member's manifest (and its sources: a member
# without targets does not load) must be there, although the product depends on neither
# stagesync-testkit nor xtask. Only stagesync itself is compiled.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY xtask ./xtask
RUN cargo build --release --locked -p stagesync

# ---- runtime --------------------------------------------------------------------------------
FROM debian:bookworm-slim
# CA certificates for TLS connections to MongoDB (Atlas, or self-managed with TLS).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 stagesync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin stagesync \
    && mkdir -p /etc/stagesync
COPY --from=builder /src/target/release/stagesync /usr/local/bin/stagesync
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Prometheus metrics and the probes (/livez, /readyz) of `--metrics-addr`.
EXPOSE 9464
# No HEALTHCHECK: the slim image has no HTTP client; orchestrators probe /livez and /readyz
# themselves (deploy/kubernetes/deployment.yaml).
ENTRYPOINT ["stagesync"]
# Mount the config at /etc/stagesync/stagesync.toml (secrets come from the environment through
# `${VAR}` in it). Logs are JSON lines on stderr (no terminal). SIGTERM stops within 10 s.
CMD ["run", "-c", "/etc/stagesync/stagesync.toml", "--metrics-addr", "0.0.0.0:9464"]
