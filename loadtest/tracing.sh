#!/usr/bin/env bash
# What OpenTelemetry tracing costs on cache hits: three stoa side by side (tracing off;
# sample_ratio 0.1; sample_ratio 1.0, both exporting to a local OTLP sink that accepts and
# drops every batch), wrk on one cached key, ROUNDS [3] interleaved rounds of DURATION [5]
# seconds; medians of requests/s, p99 and CPU µs per request, and each variant's CPU per
# request over tracing off.
#
#   loadtest/tracing.sh
#   DURATION=10 ROUNDS=5 loadtest/tracing.sh
#
# Needs wrk, curl, python3; builds stoa and stoa-demo in release mode unless NO_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
PORT_BASE=${PORT_BASE:-19700}
for tool in wrk curl python3; do command -v "$tool" >/dev/null 2>&1 || die "$tool is required"; done
if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building stoa and stoa-demo (release)" >&2
  cargo build --release -q --workspace --bins
fi

UP_PORT=$((PORT_BASE + 1))
SINK_PORT=$((PORT_BASE + 2))
ports_free "$UP_PORT" "$SINK_PORT" $((PORT_BASE + 10)) $((PORT_BASE + 11)) $((PORT_BASE + 12)) \
  $((PORT_BASE + 13)) $((PORT_BASE + 14)) $((PORT_BASE + 15))
start_work tracing

./target/release/stoa-demo --only restaurants --restaurants "127.0.0.1:$UP_PORT" \
  >"$work/demo.log" 2>&1 &
pids+=($!)
wait_for stoa-demo "http://127.0.0.1:$UP_PORT/__stats" "${pids[-1]}" "$work/demo.log"

# The OTLP sink: answers every POST 200 and counts the bytes it was sent.
cat >"$work/sink.py" <<'EOF'
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
EOF
python3 "$work/sink.py" "$SINK_PORT" &
pids+=($!)

declare -A port_of pid_of
variants=(off ratio-0.1 ratio-1.0)
i=0
for v in "${variants[@]}"; do
  port=$((PORT_BASE + 10 + 2 * i)); admin=$((port + 1)); i=$((i + 1))
  case $v in
    off) tracing="" ;;
    ratio-0.1) tracing="[tracing]
otlp_endpoint = \"http://127.0.0.1:$SINK_PORT\"
sample_ratio = 0.1" ;;
    ratio-1.0) tracing="[tracing]
otlp_endpoint = \"http://127.0.0.1:$SINK_PORT\"
sample_ratio = 1.0" ;;
  esac
  cat >"$work/$v.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
threads = 2

[admin]
listen = "127.0.0.1:$admin"

$tracing

[upstreams.restaurants]
url = "http://127.0.0.1:$UP_PORT"

[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "1h" }
EOF
  ./target/release/stoa --config "$work/$v.toml" >"$work/$v.log" 2>&1 &
  pids+=($!)
  pid_of[$v]=$!
  port_of[$v]=$port
  wait_for "stoa ($v)" "http://127.0.0.1:$admin/readyz" "$!" "$work/$v.log"
  curl -fsS -o /dev/null "http://127.0.0.1:$port/restaurant/dufva"
done

echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROUNDS interleaved rounds; $(nproc) cores" >&2
for r in $(seq 1 "$ROUNDS"); do
  for v in "${variants[@]}"; do
    read -r rps p99 _ bad cpu < <(wrk_round "${pid_of[$v]}" "http://127.0.0.1:${port_of[$v]}/restaurant/dufva")
    [ "$bad" = 0 ] || die "$v answered $bad non-2xx"
    echo "$r $v $rps $p99 $cpu" | tee -a "$work/rounds.txt" >&2
  done
done

python3 - "$work/rounds.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for r, v, rps, p99, cpu in rows:
    by.setdefault(v, []).append((int(r), float(rps), float(p99), float(cpu)))
off = {r: cpu for r, _, _, cpu in by["off"]}
print("| tracing | requests/s | p99 ms | CPU µs per hit | CPU vs off (per-round median, min-max) |")
print("| --- | --- | --- | --- | --- |")
for v in ["off", "ratio-0.1", "ratio-1.0"]:
    xs = by[v]
    ratios = [cpu / off[r] for r, _, _, cpu in xs]
    print(f"| {v} | {statistics.median(x[1] for x in xs):,.0f} | {statistics.median(x[2] for x in xs):.2f} "
          f"| {statistics.median(x[3] for x in xs):.1f} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
EOF
