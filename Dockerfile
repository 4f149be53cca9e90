# Multi-stage build: compile with the full toolchain, ship a small non-root runtime.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p herald && strip target/release/herald

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home herald
COPY --from=build /src/target/release/herald /usr/local/bin/herald
USER herald
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/herald"]
CMD ["--listen", "0.0.0.0:8080"]
