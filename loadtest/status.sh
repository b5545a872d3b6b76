#!/usr/bin/env bash
# What the status page's JSON view costs: stoa with ROUTES [200] cached routes, traffic on
# every one of them (misses, then hits), then REQUESTS [200] sequential GET /status.json on
# the admin listener timed by curl; the median and p99 answer time, and the JSON's size.
# Then the same hits under wrk with and without a poller reading /status.json ten times a
# second beside them: the page must cost the request path nothing measurable.
#
#   loadtest/status.sh
#   ROUTES=500 REQUESTS=500 loadtest/status.sh
#
# Needs curl, wrk, python3; builds stoa and stoa-demo in release mode unless NO_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh

ROUTES=${ROUTES:-200}
REQUESTS=${REQUESTS:-200}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
PORT_BASE=${PORT_BASE:-19800}
for tool in wrk curl python3; do command -v "$tool" >/dev/null 2>&1 || die "$tool is required"; done
if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building stoa and stoa-demo (release)" >&2
  cargo build --release -q --workspace --bins
fi

UP_PORT=$((PORT_BASE + 1))
PORT=$((PORT_BASE + 10))
ADMIN=$((PORT_BASE + 11))
ports_free "$UP_PORT" "$PORT" "$ADMIN"
start_work status

./target/release/stoa-demo --only restaurants --restaurants "127.0.0.1:$UP_PORT" \
  >"$work/demo.log" 2>&1 &
pids+=($!)
wait_for stoa-demo "http://127.0.0.1:$UP_PORT/__stats" "${pids[-1]}" "$work/demo.log"

{
  cat <<EOF
[server]
listen = "127.0.0.1:$PORT"
threads = 2

[admin]
listen = "127.0.0.1:$ADMIN"

[upstreams.restaurants]
url = "http://127.0.0.1:$UP_PORT"
EOF
  for i in $(seq 1 "$ROUTES"); do
    cat <<EOF

[[routes]]
name = "restaurant-$i"
methods = ["GET"]
path = "/r$i/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "1h" }
EOF
  done
} >"$work/stoa.toml"
./target/release/stoa --config "$work/stoa.toml" >"$work/stoa.log" 2>&1 &
pids+=($!)
STOA_PID=$!
wait_for stoa "http://127.0.0.1:$ADMIN/readyz" "$STOA_PID" "$work/stoa.log"

# Every route gets a miss and a few hits, so every row of the page has numbers.
for i in $(seq 1 "$ROUTES"); do
  for _ in 1 2 3; do echo "url = \"http://127.0.0.1:$PORT/r$i/dufva\""; echo 'output = "/dev/null"'; done
done >"$work/curl.cfg"
curl -fsS --no-progress-meter -o /dev/null -K "$work/curl.cfg" --parallel --parallel-max 20
curl -fsS -o "$work/status.json" "http://127.0.0.1:$ADMIN/status.json"
rows=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['routes']))" "$work/status.json")
[ "$rows" -ge "$ROUTES" ] || die "/status.json lists $rows routes, expected $ROUTES"

for _ in $(seq 1 "$REQUESTS"); do echo "url = \"http://127.0.0.1:$ADMIN/status.json\""; echo 'output = "/dev/null"'; echo 'write-out = "%{time_total} %{size_download}\n"'; done >"$work/status.cfg"
curl -fsS -K "$work/status.cfg" >"$work/times.txt"
echo "$ROUTES routes, $REQUESTS sequential GET /status.json (curl, one connection reused):" >&2
python3 - "$work/times.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ms = sorted(float(t) * 1000 for t, _ in rows)
size = int(rows[-1][1])
p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
print(f"| /status.json | median {statistics.median(ms):.2f} ms | p99 {p99:.2f} ms | max {ms[-1]:.2f} ms | {size / 1024:.0f} KiB |")
EOF

# Hits with and without a poller of /status.json (10 per second) beside them.
poll() {
  while :; do curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/status.json" || true; sleep 0.1; done
}
echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s on one route's hits, $ROUNDS interleaved rounds, with and without the poller" >&2
for r in $(seq 1 "$ROUNDS"); do
  for v in quiet polled; do
    poller=
    if [ "$v" = polled ]; then poll & poller=$!; fi
    read -r rps p99 _ bad cpu < <(wrk_round "$STOA_PID" "http://127.0.0.1:$PORT/r1/dufva")
    if [ -n "$poller" ]; then kill "$poller"; wait "$poller" 2>/dev/null || true; fi
    [ "$bad" = 0 ] || die "$v answered $bad non-2xx"
    echo "$r $v $rps $p99 $cpu" | tee -a "$work/rounds.txt" >&2
  done
done
python3 - "$work/rounds.txt" <<'EOF'
import statistics, sys
by = {}
for r, v, rps, p99, cpu in (l.split() for l in open(sys.argv[1])):
    by.setdefault(v, []).append((float(rps), float(p99), float(cpu)))
print("| hits | requests/s | p99 ms | CPU µs per hit (stoa, the poller's requests included) |")
print("| --- | --- | --- | --- |")
for v in ["quiet", "polled"]:
    xs = by[v]
    print(f"| {v} | {statistics.median(x[0] for x in xs):,.0f} | {statistics.median(x[1] for x in xs):.2f} | {statistics.median(x[2] for x in xs):.1f} |")
EOF
