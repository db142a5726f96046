# syntax=docker/dockerfile:1
#
# The gateway in a container: built on the project's toolchain, run from a
# slim Debian as an unprivileged user.
#
#   docker build -t tollgate .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 tollgate
#
# With no arguments it runs `tollgate demo` (the memory store in front of the
# built-in stand-in backend, config/demo.toml). To run your own config, mount
# it and name it:
#
#   docker run --rm -p 8080:8080 -v $PWD/my.toml:/etc/tollgate/my.toml:ro \
#     tollgate run --config /etc/tollgate/my.toml

# The toolchain the project is built and tested with (rustc 1.95) on
# Debian 12, the release the runtime stage below runs.
FROM rust:1.95-slim-bookworm AS build
# jemalloc, the binary's allocator, is built from its C sources with make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target caches survive between builds; the binary is
# copied out of the cache mount, which does not outlive this step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tollgate \
    && install -D target/release/tollgate /out/tollgate

FROM debian:bookworm-slim
# Upstream TLS uses the webpki roots built into the binary, so the image
# needs no ca-certificates; the health check is the binary's own.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tollgate
COPY --from=build /out/tollgate /usr/local/bin/tollgate
COPY config/ /etc/tollgate/
USER tollgate
# 8080: the proxy; 9090: the admin listener (health, metrics, usage API and
# pages). Publish 9090 only where operators reach it.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["tollgate", "health", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["tollgate"]
CMD ["demo", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090"]
