# Production image: build a release binary, run it as a non-root user on Debian slim.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY sql sql
COPY templates templates
COPY static static
COPY benches benches
RUN cargo build --release --locked --bin os-credits

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin credits
COPY --from=builder /src/target/release/os-credits /usr/local/bin/os-credits
USER credits
ENV CREDITS_HOST=0.0.0.0 CREDITS_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${CREDITS_PORT}/ping" || exit 1
ENTRYPOINT ["os-credits"]
CMD ["serve"]
