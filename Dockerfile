# amb in a small image: built in a Rust image, run as a non-root user in Debian slim.
#   docker build -t amb .
#   sudo chown -R 10001:10001 certs     # amb runs as uid 10001 and reads only keys it owns (mode 0600)
#   docker run --rm -v "$PWD/certs:/etc/amb/certs:ro" -v "$PWD/amb.toml:/etc/amb/amb.toml:ro" \
#     -p 7443:7443/tcp -p 7443:7443/udp amb server --config /etc/amb/amb.toml
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin amb

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 amb \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin amb
COPY --from=build /src/target/release/amb /usr/local/bin/amb
# Numeric, so Kubernetes can verify runAsNonRoot without a runAsUser of its own.
USER 10001:10001
EXPOSE 7443/tcp 7443/udp
ENTRYPOINT ["/usr/local/bin/amb"]
CMD ["--help"]
