#!/usr/bin/env bash
# Runs the demo: the five demo upstreams (stoa-demo) and the gateway on config/demo.toml.
# Gateway on 127.0.0.1:8080, admin on 127.0.0.1:9901. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
CONFIG=${STOA_CONFIG:-config/demo.toml}

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

echo "stoa: gateway on http://127.0.0.1:8080, admin on http://127.0.0.1:9901 (Ctrl-C to stop)"
echo "try:  curl localhost:8080/restaurant/dufva"
"$BIN/stoa" --config "$CONFIG"
