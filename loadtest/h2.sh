#!/usr/bin/env bash
# HTTP/2 over TLS, side by side: stoa's TLS listener against nginx (HTTP/2, the same
# certificate, proxy_cache) in front of the same demo upstream, driven by h2load. Rows:
#   h2 hits          GET /restaurant/dufva, cached (60 s) by both, HTTP/2 over TLS
#   h2 pass-through  GET /api/restaurant/dufva, not cached: every request reaches the upstream
#   h1 TLS hits      the hit row again, HTTP/1.1 over TLS (h2load --h1)
# Each row: requests/s and the server's CPU time per request (user + system, all its
# processes, from /proc/PID/stat), for stoa and nginx, and their ratio.
#
#   loadtest/h2.sh                    # 3 rounds of 10 s per row and server
#   DURATION=2 ROUNDS=1 loadtest/h2.sh  # a smoke run
#   loadtest/h2.sh --idle             # idle connections instead: RSS per connection
#
# --idle: for each of IDLE_MODES ["tls h2": TLS HTTP/1.1, HTTP/2] in turn,
# loadtest/idle_conns.py opens IDLE_CONNS [5000] connections to each server (one cache hit
# each, then idle for 3 s), WARM [1000] of them first: the slope from WARM to IDLE_CONNS is
# the RSS one more idle connection costs (stoa's process; nginx's workers summed). A run
# after another reuses the memory the first freed: give one mode per run for figures.
#
# environment (defaults in brackets): DURATION [10] seconds per run, ROUNDS [3],
# CLIENTS [50] connections, STREAMS [10] concurrent streams per HTTP/2 connection (h2load -m),
# WORKERS [2] stoa threads and nginx worker processes, PORT_BASE [19300],
# BIN [target/release] where stoa and stoa-demo are, NO_BUILD=1 to use them as they are.
# Installs what is missing (nghttp2-client for h2load, nginx-light, openssl, curl) with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-50}
STREAMS=${STREAMS:-10}
WORKERS=${WORKERS:-2}
PORT_BASE=${PORT_BASE:-19300}
BIN=${BIN:-target/release}
IDLE_MODE=0
[ "${1:-}" = --idle ] && IDLE_MODE=1
IDLE_CONNS=${IDLE_CONNS:-5000}
IDLE_MODES=${IDLE_MODES:-"tls h2"}
WARM=${WARM:-1000}

UP_PORT=$((PORT_BASE + 1))
STOA_PORT=$((PORT_BASE + 2)); STOA_TLS=$((PORT_BASE + 3)); STOA_ADMIN=$((PORT_BASE + 4))
NGINX_TLS=$((PORT_BASE + 5))

. loadtest/lib.sh

need=()
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq || echo "apt-get update failed" >&2
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v h2load >/dev/null 2>&1 || die "h2load is required (apt-get install nghttp2-client)"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx is required (apt-get install nginx-light)"

if [ "${NO_BUILD:-0}" != 1 ] && [ "$BIN" = target/release ]; then
  echo "building stoa (cargo build --release --workspace --bins)" >&2
  cargo build --release -q --workspace --bins
fi
[ -x "$BIN/stoa" ] && [ -x "$BIN/stoa-demo" ] || die "$BIN/stoa and $BIN/stoa-demo are missing"

start_work h2

ports_free $UP_PORT $STOA_PORT $STOA_TLS $STOA_ADMIN $NGINX_TLS

# The certificate both servers present.
tls=$(./scripts/demo-cert.sh "$work/tls")
tls=$(cd "$tls" && pwd)

"$BIN/stoa-demo" --only restaurants --restaurants "127.0.0.1:$UP_PORT" >"$work/demo.log" 2>&1 &
pids+=($!); wait_for stoa-demo "http://127.0.0.1:$UP_PORT/api/" $! "$work/demo.log"

cat >"$work/stoa.toml" <<TOML
[server]
listen = "127.0.0.1:$STOA_PORT"
listen_tls = "127.0.0.1:$STOA_TLS"
threads = $WORKERS
keepalive_requests = 100000000   # as nginx's below: no connection closed during a run
[server.tls]
cert = "$tls/cert.pem"
key = "$tls/key.pem"
[admin]
listen = "127.0.0.1:$STOA_ADMIN"
[log]
access_log = false
[upstreams.restaurants]
url = "http://127.0.0.1:$UP_PORT"
[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "60s", stale_while_revalidate = "60s" }
[[routes]]
name = "api"
methods = ["GET"]
path = "/api/{*rest}"
upstream = "restaurants"
TOML
"$BIN/stoa" check --config "$work/stoa.toml" >"$work/stoa.check" 2>&1 \
  || { cat "$work/stoa.check" >&2; die "the generated stoa configuration is invalid"; }
RUST_LOG=warn "$BIN/stoa" --config "$work/stoa.toml" >"$work/stoa.log" 2>&1 &
stoa_pid=$!; pids+=($stoa_pid)
wait_for stoa "http://127.0.0.1:$STOA_ADMIN/readyz" $stoa_pid "$work/stoa.log"

# nginx: `http2 on` from 1.25.1, `listen ... http2` before.
nginx_version=$("$NGINX" -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if printf '%s\n1.25.1\n' "$nginx_version" | sort -V -C; then
  listen="listen 127.0.0.1:$NGINX_TLS ssl http2 backlog=4096;"; http2=""
else
  listen="listen 127.0.0.1:$NGINX_TLS ssl backlog=4096;"; http2="http2 on;"
fi
# nginx closes a connection after keepalive_requests (default 1,000) requests, HTTP/2 ones
# too since 1.19.7 (http2_max_requests before, now obsolete), and h2load does not reconnect:
# with the defaults nginx's rows stopped at CLIENTS x 1,000 requests per run (exactly
# 10,000 requests/s for -c50 over 5 s). Raised for the run, as stoa's HTTP/1.1 limit
# (server.keepalive_requests, also 1,000 by default) is above, so that neither server closes
# a connection during a run.
max_requests=100000000
if printf '%s\n1.19.7\n' "$nginx_version" | sort -V -C; then
  http2_max_requests="http2_max_requests $max_requests;"
else
  http2_max_requests=""
fi
mkdir -p "$work/nginx/tmp" "$work/nginx/cache"
cat >"$work/nginx.conf" <<NGINX
worker_processes $WORKERS;
pid $work/nginx.pid;
error_log $work/nginx/error.log warn;
daemon off;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests $max_requests;
  $http2_max_requests
  client_body_temp_path $work/nginx/tmp;
  proxy_temp_path $work/nginx/tmp;
  proxy_cache_path $work/nginx/cache levels=1:2 keys_zone=stoa:10m max_size=256m inactive=10m;
  upstream restaurants { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    $listen
    $http2
    ssl_certificate $tls/cert.pem;
    ssl_certificate_key $tls/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    http2_max_concurrent_streams 100;
    location /restaurant/ {
      proxy_pass http://restaurants/api/restaurant/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$UP_PORT;
      proxy_cache stoa;
      proxy_cache_lock on;
      proxy_cache_use_stale updating error timeout;
      proxy_cache_background_update on;
      proxy_cache_valid 200 60s;
      add_header X-Cache \$upstream_cache_status;
    }
    location /api/ {
      proxy_pass http://restaurants;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$UP_PORT;
    }
  }
}
NGINX
"$NGINX" -t -p "$work/nginx" -c "$work/nginx.conf" >"$work/nginx-t.out" 2>&1 \
  || { cat "$work/nginx-t.out" >&2; die "nginx rejected the generated configuration"; }
"$NGINX" -p "$work/nginx" -c "$work/nginx.conf" >"$work/nginx.out" 2>&1 &
nginx_pid=$!; pids+=($nginx_pid)
wait_for nginx "https://127.0.0.1:$NGINX_TLS/api/" $nginx_pid "$work/nginx.out"

declare -A url_of=([stoa]="https://127.0.0.1:$STOA_TLS" [nginx]="https://127.0.0.1:$NGINX_TLS")
declare -A pid_of=([stoa]=$stoa_pid [nginx]=$nginx_pid)
for t in stoa nginx; do   # both speak HTTP/2 by ALPN, and the hit key is warm
  v=$(curl -ks -o /dev/null -w '%{http_version}' --http2 "${url_of[$t]}/restaurant/dufva")
  [ "$v" = 2 ] || die "$t did not answer in HTTP/2 (got $v)"
  curl -ks -o /dev/null "${url_of[$t]}/restaurant/dufva"
done

if [ "$IDLE_MODE" = 1 ]; then
  ulimit -n $((IDLE_CONNS * 2 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  echo "idle connections: $IDLE_CONNS per run, slope from $WARM; $(nproc) cores" >&2
  printf '%-16s %-6s %s\n' row server result
  for mode in $IDLE_MODES; do
    flag=(); [ "$mode" = h2 ] && flag=(--h2)
    for t in stoa nginx; do
      pid_args=()
      if [ "$t" = nginx ]; then
        for p in $(pgrep -P "$nginx_pid"); do pid_args+=(--pid "$p"); done
      else
        pid_args=(--pid "$stoa_pid")
      fi
      out=$(python3 loadtest/idle_conns.py "${url_of[$t]}/restaurant/dufva" "${pid_args[@]}" \
        --connections "$IDLE_CONNS" --warm "$WARM" --idle 3 "${flag[@]}") \
        || echo "h2.sh: idle_conns.py: not every connection was answered ($t, $mode)" >&2
      printf '%-16s %-6s %s\n' "$mode" "$t" "$out"
      sleep 3   # the closed connections gone before the next run
    done
  done
  exit 0
fi

# CPU ticks (user + system) of PID and its children (nginx's workers).
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    [ -r "/proc/$p/stat" ] || continue
    total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

results=$work/results.tsv
: >"$results"
# run ROW TARGET PATH [h2load flags]: one h2load run; records req/s and CPU µs per request.
run() {
  local row=$1 t=$2 path=$3; shift 3
  local before after out rps done_ failed
  before=$(ticks "${pid_of[$t]}")
  out=$(h2load -D "$DURATION" -c "$CLIENTS" -t 1 "$@" "${url_of[$t]}$path" 2>&1) \
    || { echo "$out" >&2; die "h2load failed against $t"; }
  after=$(ticks "${pid_of[$t]}")
  rps=$(awk '/^finished in/ { for (i = 1; i <= NF; i++) if ($(i+1) == "req/s,") print $i }' <<<"$out")
  done_=$(awk '/^requests:/ { for (i = 1; i <= NF; i++) if ($(i+1) == "succeeded,") print $i }' <<<"$out")
  failed=$(awk '/^status codes:/ { print $5 + $7 + $9 }' <<<"$out")   # 3xx, 4xx, 5xx
  [ "${failed:-0}" = 0 ] || echo "h2.sh: $row, $t: $failed non-2xx answers" >&2
  printf '%s\t%s\t%s\t%s\t%s\n' "$row" "$t" "$rps" "$done_" "$(( (after - before) * 1000000 / HZ ))" >>"$results"
}

echo "stoa and nginx on 127.0.0.1, $(nproc) cores, $WORKERS workers each; h2load -c$CLIENTS -m$STREAMS," \
     "$ROUNDS round(s) of ${DURATION}s per row and server" >&2
for r in $(seq 1 "$ROUNDS"); do
  for t in stoa nginx; do
    echo "round $r: $t" >&2
    run "h2 hits" "$t" /restaurant/dufva -m "$STREAMS"
    run "h2 pass-through" "$t" /api/restaurant/dufva -m "$STREAMS"
    # One request at a time per connection: -m would pipeline on HTTP/1.1.
    run "h1 TLS hits" "$t" /restaurant/dufva --h1 -m 1
  done
done

python3 - "$results" <<'PY'
import sys
from collections import defaultdict
from statistics import median
runs = defaultdict(lambda: defaultdict(list))  # row -> target -> [(req/s, CPU µs per request)]
order = []
for line in open(sys.argv[1]):
    row, t, rps, done, cpu = line.rstrip("\n").split("\t")
    if row not in order:
        order.append(row)
    done = int(done or 0)
    runs[row][t].append((float(rps or 0), int(cpu) / done if done else float("nan")))
def cell(row, t):
    got = runs[row][t]
    if not got:
        return float("nan"), float("nan")
    return median(r for r, _ in got), median(c for _, c in got)
print(f"{'row':<16} {'stoa req/s':>11} {'nginx req/s':>12} {'ratio':>6}   {'stoa µs/req':>11} {'nginx µs/req':>12} {'ratio':>6}")
for row in order:
    s_rps, s_cpu = cell(row, "stoa")
    n_rps, n_cpu = cell(row, "nginx")
    r1 = s_rps / n_rps if n_rps else float("nan")
    r2 = s_cpu / n_cpu if n_cpu else float("nan")
    print(f"{row:<16} {s_rps:>11.0f} {n_rps:>12.0f} {r1:>6.2f}   {s_cpu:>11.1f} {n_cpu:>12.1f} {r2:>6.2f}")
print("Medians of the rounds. CPU per request: user + system time of the server's processes")
print("during the run, over the requests answered.")
PY
