# One image per service, from the workspace:
#   docker build --build-arg SERVICE=order-ingest -t elo/order-ingest .   (or: make images)
# SERVICE is one of order-ingest, salesforce-sink, rdstation-sink, reconciler.
ARG RUST_VERSION=1.95

# Build: the whole workspace source, one release binary. Cargo.lock pins every crate.
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG SERVICE
RUN test -n "$SERVICE" || (echo "--build-arg SERVICE=<service> is required" >&2; exit 1)
WORKDIR /build
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY crates crates
COPY services services
COPY tests tests
COPY schemas schemas
RUN cargo build --release --locked -p "$SERVICE" \
 && strip "target/release/$SERVICE" \
 # librdkafka links zlib, which the runtime image lacks: carry it over at the same path.
 && multiarch="$(gcc -print-multiarch)" \
 && mkdir -p "/out/usr/lib/$multiarch" \
 && cp -L "/usr/lib/$multiarch/libz.so.1" "/out/usr/lib/$multiarch/"

# Runtime: glibc, OpenSSL and CA certificates only; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG SERVICE
LABEL org.opencontainers.image.title="elo-${SERVICE}"
COPY --from=build /out/ /
COPY --from=build /build/target/release/${SERVICE} /usr/local/bin/service
# 65532 is distroless's "nonroot"; the Kubernetes manifests run as the same user.
USER 65532:65532
# 9100: /metrics, /health/livez, /health/readyz. 8080: order-ingest's webhooks.
EXPOSE 9100 8080
ENV ELO_ADMIN_LISTEN=0.0.0.0:9100 ELO_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/service"]
