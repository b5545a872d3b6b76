# syntax=docker/dockerfile:1
# Multi-stage build: compile stoa and stoa-demo, ship them on a slim non-root image.
#
#   docker build -t stoa .
#   docker run -p 8080:8080 -v "$PWD/my-stoa.toml:/etc/stoa/stoa.toml:ro" stoa
#
# The configuration is read from /etc/stoa/stoa.toml (STOA_CONFIG); any key can be
# overridden with STOA_<SECTION>__<KEY> variables. Inside the container the gateway
# listens on 0.0.0.0:8080; the admin listener stays on loopback unless overridden
# (STOA_ADMIN__LISTEN=0.0.0.0:9901) and is used by the HEALTHCHECK.

FROM rust:1-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins --locked \
 && strip target/release/stoa target/release/stoa-demo

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin stoa
COPY --from=build /src/target/release/stoa /usr/local/bin/stoa
COPY --from=build /src/target/release/stoa-demo /usr/local/bin/stoa-demo
COPY config/ /etc/stoa/examples/
COPY config/demo.toml /etc/stoa/stoa.toml
USER stoa
ENV STOA_CONFIG=/etc/stoa/stoa.toml \
    STOA_SERVER__LISTEN=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["stoa"]
CMD ["run"]
