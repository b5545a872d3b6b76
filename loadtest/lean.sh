#!/usr/bin/env bash
# The floor's two forwarding paths side by side: stoa-floor --path proxy (pingora's ProxyHttp)
# and --path lean (pingora-core's HTTP/1 sessions, no ProxyHttp), in front of one nginx serving
# a static file, driven by wrk in interleaved rounds. Prints requests/s, p99 and CPU µs per
# request (user + system of the server's threads over the run, /proc/PID/stat) of every run,
# then the medians.
#
#   loadtest/lean.sh
#   DURATION=5 ROUNDS=3 CONNECTIONS=50 WORKERS=2 MODEL=split loadtest/lean.sh
#
# Needs nginx, wrk and python3; uses target/release/stoa-floor (cargo build --release -p stoa-floor).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
WORKERS=${WORKERS:-2}
MODEL=${MODEL:-split}
POOL=${POOL:-own}
PORT_BASE=${PORT_BASE:-19300}
ORIGIN_PORT=$((PORT_BASE + 1)); PROXY_PORT=$((PORT_BASE + 2)); LEAN_PORT=$((PORT_BASE + 3))

. loadtest/lib.sh
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx is required"
command -v wrk >/dev/null 2>&1 || die "wrk is required"
[ -x target/release/stoa-floor ] || die "build it first: cargo build --release -p stoa-floor"

start_work lean
ports_free $ORIGIN_PORT $PROXY_PORT $LEAN_PORT

start_static_origin "$ORIGIN_PORT"

declare -A pid_of port_of=([proxy]=$PROXY_PORT [lean]=$LEAN_PORT)
for path in proxy lean; do
  ./target/release/stoa-floor --listen "127.0.0.1:${port_of[$path]}" --peer "127.0.0.1:$ORIGIN_PORT" \
    --threads "$WORKERS" --model "$MODEL" --path "$path" --pool "$POOL" >"$work/$path.log" 2>&1 &
  pids+=($!); pid_of[$path]=$!
  wait_for "stoa-floor --path $path" "http://127.0.0.1:${port_of[$path]}/api/restaurant/dufva" $! "$work/$path.log"
done

echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROUNDS interleaved rounds; stoa-floor --threads $WORKERS --model $MODEL (lean: --pool $POOL); $(nproc) cores"
printf '%-6s %5s %12s %9s %14s\n' path round requests/s "p99 ms" "CPU us/req"
results=$work/results
for r in $(seq 1 "$ROUNDS"); do
  for path in proxy lean; do
    read -r rps p99 _ bad cpu < <(wrk_round "${pid_of[$path]}" "http://127.0.0.1:${port_of[$path]}/api/restaurant/dufva")
    [ "$bad" = 0 ] || echo "  ($path, round $r: $bad non-2xx answers)"
    printf '%-6s %5s %12s %9s %14s\n' "$path" "$r" "$rps" "$p99" "$cpu"
    echo "$path $rps $p99 $cpu" >>"$results"
  done
done
echo "medians:"
python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    path, *vals = line.split()
    rows.setdefault(path, []).append([float(v) for v in vals])
med = {p: [statistics.median(col) for col in zip(*v)] for p, v in rows.items()}
for p, (rps, p99, cpu) in med.items():
    print(f"{p:<6} {rps:>12,.0f} requests/s  p99 {p99:6.2f} ms  {cpu:6.1f} CPU us/req")
if "proxy" in med and "lean" in med:
    print(f"lean/proxy: requests/s {med['lean'][0] / med['proxy'][0]:.2f}x,"
          f" CPU per request {med['lean'][2] / med['proxy'][2]:.2f}x")
PY
