# Multi-stage build: compile with the full toolchain, ship a small non-root runtime.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p herald && strip target/release/herald

FROM debian:bookworm-slim
# The system trust store, for rediss:// to a Redis whose certificate a public CA signed
# (redis.tls_ca_file unset).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home herald
COPY --from=build /src/target/release/herald /usr/local/bin/herald
USER herald
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/herald"]
# WebSockets on every interface; the publish API and /metrics only inside the container
# (loopback) until you give them a key: set HERALD_AUTH__API_KEY and
# --internal-listen 0.0.0.0:9090 (see docker-compose.yml). Herald refuses to serve the
# API on a public address without a key.
CMD ["--listen", "0.0.0.0:8080", "--internal-listen", "127.0.0.1:9090"]
