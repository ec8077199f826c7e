# syntax=docker/dockerfile:1
# The `epp` server image: a release build of the binary on a distroless glibc base, run as
# the unprivileged `nonroot` user. TLS is rustls, so the image carries no OpenSSL.
#
#   docker build -t epp-rs/epp .
#   docker build --build-arg EPP_FEATURES= -t epp-rs/epp .   # without Kubernetes discovery

FROM rust:1-bookworm AS builder
# Cargo features of epp-ext-proc-adapter, comma-separated; `kubernetes` watches the
# InferencePool and its pods. The demo is left out of the image.
ARG EPP_FEATURES=kubernetes
WORKDIR /src
COPY . .
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p epp-ext-proc-adapter --bin epp --no-default-features \
        ${EPP_FEATURES:+--features "$EPP_FEATURES"} \
    && cp target/release/epp /epp

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /epp /epp
USER nonroot
# ext-proc gRPC, gRPC health (liveness, readiness), Prometheus /metrics.
EXPOSE 9002 9003 9090
ENTRYPOINT ["/epp"]
