# syntax=docker/dockerfile:1
# One image per program, chosen by build arguments:
#   docker build --build-arg CRATE=tenantry-api      --build-arg BIN=tenantry-api      -t ghcr.io/tenantry/tenantry-api:0.1.0 .
#   docker build --build-arg CRATE=tenantry-operator --build-arg BIN=tenantry-operator -t ghcr.io/tenantry/tenantry-operator:0.1.0 .
#   docker build --build-arg CRATE=tenant-runtime    --build-arg BIN=tenant-runtime    -t ghcr.io/tenantry/tenant-runtime:0.1.0 .
#   docker build --build-arg CRATE=tenantry-portal   --build-arg BIN=tenantry-portal   -t ghcr.io/tenantry/tenantry-portal:0.1.0 .
# The program is /usr/local/bin/<BIN> (so `kubectl exec ... -- tenantry-api bootstrap-admin`
# works) and the entrypoint; it runs as distroless's nonroot user, UID 65532.

ARG RUST_VERSION=1.95

# Bookworm, to match the glibc of the distroless Debian 12 runtime below.
FROM rust:${RUST_VERSION}-bookworm AS builder
ARG CRATE=tenantry-api
ARG BIN=tenantry-api
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p "${CRATE}" --bin "${BIN}" \
    && install -D -m 0755 "target/release/${BIN}" "/out/${BIN}" \
    && ln -s "${BIN}" /out/entrypoint

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/entrypoint"]
