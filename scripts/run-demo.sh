#!/usr/bin/env bash
# Runs the demo: the five demo upstreams (stoa-demo) and the gateway on config/demo.toml.
# Gateway on 127.0.0.1:8080 (HTTP/1.1 and h2c), https://localhost:8443 (HTTP/2 and HTTP/1.1,
# a self-signed certificate made on the first run), admin on 127.0.0.1:9901. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
CONFIG=${STOA_CONFIG:-config/demo.toml}

# The HTTPS listener: its certificate is made here, so the file stays free of generated paths.
TLS_DIR=$(./scripts/demo-cert.sh)
export STOA_SERVER__LISTEN_TLS=${STOA_SERVER__LISTEN_TLS:-127.0.0.1:8443}
export STOA_SERVER__TLS__CERT=${STOA_SERVER__TLS__CERT:-$TLS_DIR/cert.pem}
export STOA_SERVER__TLS__KEY=${STOA_SERVER__TLS__KEY:-$TLS_DIR/key.pem}

"$BIN/stoa" check --config "$CONFIG"

"$BIN/stoa-demo" &
demo_pid=$!
stop() {
  kill "$demo_pid" 2>/dev/null || true
  wait "$demo_pid" 2>/dev/null || true
}
trap stop EXIT

# Wait for the demo upstreams before opening the gateway.
for _ in $(seq 1 100); do
  if curl -fsS -o /dev/null http://127.0.0.1:9001/api/; then break; fi
  sleep 0.1
done

echo "stoa: gateway on http://127.0.0.1:8080 and https://localhost:8443, admin on http://127.0.0.1:9901 (Ctrl-C to stop)"
echo "      TLS certificate: $STOA_SERVER__TLS__CERT (self-signed; key beside it)"
echo "try:  curl localhost:8080/restaurant/dufva"
echo "      curl --http2 -k https://localhost:8443/restaurant/dufva"
echo "      curl --http2-prior-knowledge localhost:8080/restaurant/dufva"
"$BIN/stoa" --config "$CONFIG"
