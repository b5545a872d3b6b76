#!/usr/bin/env bash
# A flood of distinct client ids on a rate-limited route, and the memory stoa gives back:
# stoa (release) with a cached route limited per `X-API-Key` (one request per REFILL [30]
# seconds, burst 20), wrk sends IDS [1000000] requests, each with a new key (every one a new
# bucket in the limiter), then nothing. The limiter's pruner runs every 10 s (PRUNE_EVERY in
# src/app.rs) and drops a bucket once it is full again plus one interval: a key that made one
# request is forgotten 2 x REFILL after it, so a flood shorter than that holds every key at
# its end. The script waits for the prune that drops the last keys (2 x REFILL + 10 s + 1 s
# after the flood), then watches stoa's resident set for AFTER [60] seconds more. Prints RSS
# before the flood, at its peak (VmHWM), at its end, once the prune has run, and AFTER
# seconds later, with the rate of the flood.
#
#   loadtest/flood.sh
#   IDS=10000000 loadtest/flood.sh
#
# environment (defaults in brackets): IDS [1000000] distinct keys, REFILL [30] seconds per
# request of the policy (whole seconds), CONNECTIONS [50],
# MAX_SECONDS [900] bound on the flood, AFTER [60] seconds watched after the prune,
# WORKERS [2] stoa threads, PORT_BASE [19600], BIN [target/release], NO_BUILD=1 to use the
# binaries as they are, STOA_ENV (e.g. "MIMALLOC_PURGE_DELAY=0") passed to stoa's environment.
# Needs wrk (installed if missing), curl and python3; 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh

IDS=${IDS:-1000000}
CONNECTIONS=${CONNECTIONS:-50}
MAX_SECONDS=${MAX_SECONDS:-900}
AFTER=${AFTER:-60}
REFILL=${REFILL:-30}
WORKERS=${WORKERS:-2}
PORT_BASE=${PORT_BASE:-19600}
BIN=${BIN:-target/release}
STOA_ENV=${STOA_ENV:-}
# The pruner's period (PRUNE_EVERY in src/app.rs) and the policy's idle expiry: a key that
# made one request is forgotten once its bucket is full again plus one interval.
PRUNE_EVERY=10
IDLE_EXPIRY=$((2 * REFILL))

UP_PORT=$((PORT_BASE + 1))
STOA_PORT=$((PORT_BASE + 2)); STOA_ADMIN=$((PORT_BASE + 3))

if ! command -v wrk >/dev/null 2>&1; then
  echo "installing wrk" >&2
  SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends wrk \
    >/dev/null || true
fi
for tool in wrk curl python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done
if [ "${NO_BUILD:-0}" != 1 ] && [ "$BIN" = target/release ]; then
  echo "building stoa and stoa-demo (release)" >&2
  cargo build --release -q --workspace --bins
fi
[ -x "$BIN/stoa" ] && [ -x "$BIN/stoa-demo" ] || die "$BIN/stoa and $BIN/stoa-demo are missing"

ports_free $UP_PORT $STOA_PORT $STOA_ADMIN
start_work flood

"$BIN/stoa-demo" --only restaurants --restaurants "127.0.0.1:$UP_PORT" >"$work/demo.log" 2>&1 &
pids+=($!); wait_for stoa-demo "http://127.0.0.1:$UP_PORT/api/" $! "$work/demo.log"

cat >"$work/stoa.toml" <<TOML
[server]
listen = "127.0.0.1:$STOA_PORT"
threads = $WORKERS
[admin]
listen = "127.0.0.1:$STOA_ADMIN"
[log]
access_log = false
[rate_limits.per_key]
requests_per_second = $(awk -v r="$REFILL" 'BEGIN { printf "%.9f", 1 / r }')
burst = 20
client = "header:X-API-Key"
[upstreams.restaurants]
url = "http://127.0.0.1:$UP_PORT"
[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
rate_limit = "per_key"
cache = { ttl = "1h" }
TOML
"$BIN/stoa" check --config "$work/stoa.toml" >"$work/stoa.check" 2>&1 \
  || { cat "$work/stoa.check" >&2; die "the generated stoa configuration is invalid"; }
# shellcheck disable=SC2086 # STOA_ENV is a list of NAME=VALUE words
env RUST_LOG=warn $STOA_ENV "$BIN/stoa" --config "$work/stoa.toml" >"$work/stoa.log" 2>&1 &
stoa_pid=$!; pids+=($stoa_pid)
wait_for stoa "http://127.0.0.1:$STOA_ADMIN/readyz" $stoa_pid "$work/stoa.log"

url="http://127.0.0.1:$STOA_PORT/restaurant/dufva"
code=$(curl -sS -o /dev/null -w '%{http_code}' -H 'X-API-Key: warm' "$url")
[ "$code" = 200 ] || die "the flooded route answered $code"
rl=$(curl -sS -o /dev/null -D - -H 'X-API-Key: warm' "$url" | tr -d '\r' | grep -i '^ratelimit-policy:' || true)
[ -n "$rl" ] || die "the flooded route carries no RateLimit-Policy: is it limited?"

kib() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$stoa_pid/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# One new key per request: k0000001, k0000002, ... Once IDS keys are sent, wrk writes the
# done file and stops its thread (the script then ends wrk, which waits out -d otherwise);
# a request asked for after that reuses an earlier key.
cat >"$work/flood.lua" <<'LUA'
local ids = tonumber(os.getenv("FLOOD_IDS"))
local done_file = os.getenv("FLOOD_DONE")
local n = 0
request = function()
  n = n + 1
  if n == ids then
    local f = io.open(done_file, "w")
    f:write(n, "\n")
    f:close()
    wrk.thread:stop()
  end
  return wrk.format(nil, nil, { ["X-API-Key"] = string.format("k%07d", (n - 1) % ids + 1) })
end
LUA

sleep 2
before=$(kib VmRSS)
echo "stoa on 127.0.0.1 ($WORKERS threads), $(nproc) cores: $IDS distinct X-API-Key values," \
     "wrk -t1 -c$CONNECTIONS; RSS before: $(mib "$before") MiB" >&2

t0=$(date +%s.%N)
FLOOD_IDS=$IDS FLOOD_DONE="$work/flood.done" \
  wrk -t1 -c"$CONNECTIONS" -d"${MAX_SECONDS}s" -s "$work/flood.lua" "$url" >"$work/wrk.out" 2>&1 &
wrk_pid=$!; pids+=($wrk_pid)
last_report=$(date +%s)
while kill -0 "$wrk_pid" 2>/dev/null && [ ! -e "$work/flood.done" ]; do
  sleep 0.2
  now=$(date +%s)
  if [ $((now - last_report)) -ge 10 ]; then
    echo "  flooding: RSS $(mib "$(kib VmRSS)") MiB" >&2
    last_report=$now
  fi
done
kill -INT "$wrk_pid" 2>/dev/null || true
wait "$wrk_pid" 2>/dev/null || true
t1=$(date +%s.%N)
sent=$(cat "$work/flood.done" 2>/dev/null || echo 0)
[ "$sent" = "$IDS" ] || echo "flood.sh: wrk stopped after ${MAX_SECONDS}s before sending every key" >&2
non2xx=$(awk '/Non-2xx/ { print $NF }' "$work/wrk.out"); non2xx=${non2xx:-0}
[ "$non2xx" = 0 ] || echo "flood.sh: $non2xx non-2xx answers during the flood" >&2
flood_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }')
at_end=$(kib VmRSS)
echo "  flood done in ${flood_s}s: RSS $(mib "$at_end") MiB" >&2

# The first prune after the last key's expiry drops every key: wait for it, then watch.
echo "  waiting $((IDLE_EXPIRY + PRUNE_EVERY + 1))s for the last keys to expire and be pruned" >&2
sleep $((IDLE_EXPIRY + PRUNE_EVERY + 1))
pruned=$(kib VmRSS)
echo "  after the prune: RSS $(mib "$pruned") MiB" >&2
for s in $(seq 10 10 "$AFTER"); do
  sleep 10
  echo "  prune + ${s}s: RSS $(mib "$(kib VmRSS)") MiB" >&2
done
after=$(kib VmRSS)
peak=$(kib VmHWM)

printf '%-10s %9s %11s %11s %10s %11s %12s\n' ids "keys/s" "before MiB" "peak MiB" "end MiB" "pruned MiB" "+${AFTER}s MiB"
printf '%-10s %9s %11s %11s %10s %11s %12s\n' "$sent" \
  "$(awk -v n="$sent" -v s="$flood_s" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')" \
  "$(mib "$before")" "$(mib "$peak")" "$(mib "$at_end")" "$(mib "$pruned")" "$(mib "$after")"
