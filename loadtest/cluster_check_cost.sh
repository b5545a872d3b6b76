#!/usr/bin/env bash
# Cost of one cluster-scope rate-limit check: the round trip of the GCRA script
# (src/ratelimit/gcra.lua) to a local Redis, measured by redis-benchmark, with one client
# (latency of a check) and with 50 (what one Redis sustains). Needs redis-server and
# redis-benchmark (scripts/install-deps.sh installs them). Run from the repository root.
set -euo pipefail
port=${PORT:-6399}
n=${N:-20000}
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
pid=$!
trap 'kill $pid; rm -rf "$dir"' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
sha=$(redis-cli -p "$port" SCRIPT LOAD "$(cat src/ratelimit/gcra.lua)")
# T = 1 us, burst 1e9: every check is admitted and writes its key, as a real one does.
for clients in 1 50; do
  echo "clients=$clients"
  redis-benchmark -p "$port" -c "$clients" -n "$n" -q \
    EVALSHA "$sha" 1 stoa:rl:bench:ip:127.0.0.1 1 1000000000
done
