#!/usr/bin/env bash
# Side-by-side benchmark: stoa against nginx (proxy_cache, proxy_cache_lock, stale while
# updating) and Varnish (grace) in front of the same demo upstreams, with the same routes and
# TTLs, driven by the same clients, on loopback. Prints one table with ratios stoa/nginx and
# stoa/Varnish. See loadtest/README.md for what each row means.
#
#   loadtest/compare.sh                  # the full comparison, about 5 minutes
#   loadtest/compare.sh --quick          # a smoke run, about 1 minute
#   loadtest/compare.sh --soak 10m       # stoa and nginx in turn under a steady mix: p99, RSS, CPU drift
#   DURATION=10s ROUNDS=5 loadtest/compare.sh
#
# Installs what is missing (nginx-light, varnish, varnish-modules, wrk, hey, curl, python3)
# with apt-get, builds stoa in release mode, and tears everything down at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
LOADTEST=$PWD/loadtest

usage() {
  cat <<'EOF'
usage: loadtest/compare.sh [--quick] [--soak DURATION]

  (no flag)        stoa vs nginx vs Varnish: cache hits, pass-through, stampede,
                   expiry under load, GET-with-JSON-body hits; one table with ratios
  --quick          the same, short: 1 round of 2 s per hit run, 6 s of expiry load
  --soak DURATION  stoa and nginx in turn under steady mixed load (hits, misses, pass-through,
                   429s) for DURATION (e.g. 10m, at least 40s): 10 s samples of each, p99,
                   RSS and CPU per request; drift first vs last minute, stoa's beside nginx's

environment (defaults in brackets):
  DURATION [5s]  ROUNDS [3]   one wrk run per server per round, servers interleaved
  CONNECTIONS [50]  THREADS [1]   wrk -t THREADS -c CONNECTIONS
  WORKERS [2]    stoa threads, nginx worker processes
  EXPIRY_DURATION [30s]  load on the 1 s TTL key, per server
  STAMPEDE_CLIENTS [1000]  UPSTREAM_LATENCY [200ms]  of the slow upstream (stampede, expiry)
  ORIGIN_WORKERS [1]  worker processes of the nginx serving the pass-through rows' file
  FLOOR_MODEL [split]  the floor's threads: split (WORKERS single-thread services) or
                 shared (one service on WORKERS threads, work stealing)
  PIPELINE_DEPTH [16]  requests written at once per connection in the pipelined rows
  PORT_BASE [19100]  ports PORT_BASE+1 .. PORT_BASE+17 on 127.0.0.1
  NO_BUILD=1     use the binaries in target/release as they are
EOF
}

QUICK=0
SOAK=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --soak) [ $# -ge 2 ] || { usage >&2; exit 2; }; SOAK=$2; shift ;;
    --soak=*) SOAK=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "compare.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  DURATION=${DURATION:-2s}; ROUNDS=${ROUNDS:-1}; EXPIRY_DURATION=${EXPIRY_DURATION:-6s}
fi
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-1}
PIPELINE_DEPTH=${PIPELINE_DEPTH:-16}
WORKERS=${WORKERS:-2}          # stoa threads and nginx worker processes alike
EXPIRY_DURATION=${EXPIRY_DURATION:-30s}
STAMPEDE_CLIENTS=${STAMPEDE_CLIENTS:-1000}
UPSTREAM_LATENCY=${UPSTREAM_LATENCY:-200ms}
PORT_BASE=${PORT_BASE:-19100}
ORIGIN_WORKERS=${ORIGIN_WORKERS:-1}
FLOOR_MODEL=${FLOOR_MODEL:-split}

. loadtest/lib.sh

# Seconds in a duration like 10s, 2m, 1h (whole numbers).
secs() {
  case $1 in
    *[0-9]s) echo "${1%s}" ;;
    *[0-9]m) echo $(( ${1%m} * 60 )) ;;
    *[0-9]h) echo $(( ${1%h} * 3600 )) ;;
    *[0-9]) echo "$1" ;;
    *) die "not a duration: $1 (use e.g. 30s, 10m)" ;;
  esac
}
DURATION_S=$(secs "$DURATION")
EXPIRY_S=$(secs "$EXPIRY_DURATION")
if [ -n "$SOAK" ]; then
  SOAK_S=$(secs "$SOAK")
  [ "$SOAK_S" -ge 40 ] || die "--soak needs at least 40s (two 10 s samples of each server)"
fi

# Ports: upstreams, stoa variants, nginx, Varnish.
UP_PORT=$((PORT_BASE + 1))           # restaurants, no added latency
STOA_PORT=$((PORT_BASE + 2)); STOA_ADMIN=$((PORT_BASE + 3))
NGINX_PORT=$((PORT_BASE + 4))
BARE_PORT=$((PORT_BASE + 5)); BARE_ADMIN=$((PORT_BASE + 6))
LOGGED_PORT=$((PORT_BASE + 7)); LOGGED_ADMIN=$((PORT_BASE + 8))
LIMITED_PORT=$((PORT_BASE + 9)); LIMITED_ADMIN=$((PORT_BASE + 10))
CLV_PORT=$((PORT_BASE + 11))         # CLV calculator (200 ms per call)
SLOW_PORT=$((PORT_BASE + 12))        # restaurants again, with UPSTREAM_LATENCY
VARNISH_PORT=$((PORT_BASE + 13))
ORIGIN_PORT=$((PORT_BASE + 14))      # nginx serving a static file: the pass-through upstream
FLOOR_PORT=$((PORT_BASE + 15))       # the floor: a bare pingora pass-through (loadtest/floor)
LEAN_PORT=$((PORT_BASE + 16))        # the floor's lean path: pingora-core HTTP/1 sessions, no ProxyHttp
RAW_PORT=$((PORT_BASE + 17))         # the floor's raw path: pingora's listener, no HTTP session

# --- what we need ---------------------------------------------------------------------
vmod_bodyaccess() { ls /usr/lib/*/varnish/vmods/libvmod_bodyaccess.so >/dev/null 2>&1; }
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ -z "$SOAK" ]; then
  command -v varnishd >/dev/null 2>&1 || [ -x /usr/sbin/varnishd ] || need+=(varnish)
  vmod_bodyaccess || need+=(varnish-modules)
  command -v hey >/dev/null 2>&1 || need+=(hey)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq || echo "apt-get update failed" >&2
  if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
    for pkg in "${need[@]}"; do   # one by one, so one missing package costs only its rows
      "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
        || echo "could not install $pkg: its rows will say N/A" >&2
    done
  fi
fi
command -v wrk >/dev/null 2>&1 || die "wrk is required (apt-get install wrk)"
command -v curl >/dev/null 2>&1 || die "curl is required"
command -v python3 >/dev/null 2>&1 || die "python3 is required"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
VARNISHD=$(command -v varnishd || echo /usr/sbin/varnishd)
HAVE_HEY=0; command -v hey >/dev/null 2>&1 && HAVE_HEY=1
# oha is optional (crates.io only: `cargo install oha --locked`, ~11 minutes on two cores).
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
HAVE_OHA=0; [ -x "$OHA" ] && HAVE_OHA=1
HAVE_VARNISH=0; [ -z "$SOAK" ] && [ -x "$VARNISHD" ] && HAVE_VARNISH=1
[ -x "$NGINX" ] || die "nginx is required (apt-get install nginx-light)"

if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building stoa (cargo build --release --workspace --bins)" >&2
  cargo build --release -q --workspace --bins
fi
[ -x target/release/stoa ] && [ -x target/release/stoa-demo ] && [ -x target/release/stoa-floor ] \
  || die "target/release/stoa, stoa-demo and stoa-floor are missing"

# --- processes and teardown ------------------------------------------------------------
start_work compare

ports_free $UP_PORT $STOA_PORT $STOA_ADMIN $NGINX_PORT $BARE_PORT $BARE_ADMIN $LOGGED_PORT \
            $LOGGED_ADMIN $LIMITED_PORT $LIMITED_ADMIN $CLV_PORT $SLOW_PORT $VARNISH_PORT \
            $ORIGIN_PORT $FLOOR_PORT $LEAN_PORT $RAW_PORT

c() { curl -fsS -m 10 "$@"; }
reset_stats() { c -X POST -o /dev/null "http://127.0.0.1:$1/__stats/reset"; }
# upstream_stat PORT FIELD: a number from the demo upstream's /__stats.
upstream_stat() { c "http://127.0.0.1:$1/__stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"; }

# cpu_us PID: CPU time (user + system, µs) PID and its descendants have used so far, from
# /proc/PID/stat (nginx's master and workers, varnishd's children, stoa's threads).
cpu_us() {
  python3 - "$1" <<'PY'
import os, sys
root = int(sys.argv[1])
children, ticks = {}, {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        with open(f"/proc/{d}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    pid = int(d)
    children.setdefault(int(fields[1]), []).append(pid)   # field 4: ppid
    ticks[pid] = int(fields[11]) + int(fields[12])         # fields 14, 15: utime, stime
todo, total = [root], 0
while todo:
    p = todo.pop()
    total += ticks.get(p, 0)
    todo.extend(children.get(p, []))
print(total * 1_000_000 // os.sysconf("SC_CLK_TCK"))
PY
}

results=$work/results.tsv
notes=$work/notes.txt
: >"$results"; : >"$notes"
rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"; }   # scenario target round metric value
note() { echo "$*" >>"$notes"; }

# --- the upstreams -----------------------------------------------------------------------
./target/release/stoa-demo --only restaurants --only clv --restaurants "127.0.0.1:$UP_PORT" \
  --clv "127.0.0.1:$CLV_PORT" >"$work/demo.log" 2>&1 &
pids+=($!); wait_for "stoa-demo (restaurants, clv)" "http://127.0.0.1:$UP_PORT/api/" $! "$work/demo.log"
if [ -z "$SOAK" ]; then
  ./target/release/stoa-demo --only restaurants --restaurants "127.0.0.1:$SLOW_PORT" \
    --latency "restaurants=$UPSTREAM_LATENCY" >"$work/demo-slow.log" 2>&1 &
  pids+=($!); wait_for "stoa-demo (slow restaurants)" "http://127.0.0.1:$SLOW_PORT/__stats" $! "$work/demo-slow.log"
fi

# The pass-through rows' upstream: nginx serving the demo's answer as a static file, so the
# upstream is not what limits them (its own rate is measured and printed).
API_UPSTREAM=http://127.0.0.1:$UP_PORT
if [ -z "$SOAK" ]; then
  c "http://127.0.0.1:$UP_PORT/api/restaurant/dufva" >"$work/demo-answer.json"
  start_static_origin "$ORIGIN_PORT" "$ORIGIN_WORKERS" "$work/demo-answer.json"
  API_UPSTREAM=http://127.0.0.1:$ORIGIN_PORT

  # The floor: a bare pingora pass-through to the same origin, stoa's thread count.
  ./target/release/stoa-floor --listen "127.0.0.1:$FLOOR_PORT" --peer "127.0.0.1:$ORIGIN_PORT" \
    --threads "$WORKERS" --model "$FLOOR_MODEL" >"$work/floor.log" 2>&1 &
  pids+=($!); floor_pid=$!
  wait_for "stoa-floor" "http://127.0.0.1:$FLOOR_PORT/api/restaurant/dufva" $! "$work/floor.log"
  # The same floor on its lean path: a custom pingora-core ServerApp on the HTTP/1 sessions.
  ./target/release/stoa-floor --listen "127.0.0.1:$LEAN_PORT" --peer "127.0.0.1:$ORIGIN_PORT" \
    --threads "$WORKERS" --model "$FLOOR_MODEL" --path lean >"$work/lean.log" 2>&1 &
  pids+=($!); lean_pid=$!
  wait_for "stoa-floor --path lean" "http://127.0.0.1:$LEAN_PORT/api/restaurant/dufva" $! "$work/lean.log"
  # And on its raw path: no HTTP session, httparse both sides, the bytes as they came.
  ./target/release/stoa-floor --listen "127.0.0.1:$RAW_PORT" --peer "127.0.0.1:$ORIGIN_PORT" \
    --threads "$WORKERS" --model "$FLOOR_MODEL" --path raw >"$work/raw.log" 2>&1 &
  pids+=($!); raw_pid=$!
  wait_for "stoa-floor --path raw" "http://127.0.0.1:$RAW_PORT/api/restaurant/dufva" $! "$work/raw.log"
fi

# --- stoa, in the variants compared ------------------------------------------------------
# Same routes everywhere (nginx and Varnish below mirror them):
#   /restaurant/{id}           cached 60 s (+60 s stale while revalidating): the hit path
#   /api/{*rest}               pass-through, no cache (to the origin nginx's static file; in
#                              the soak, to the demo upstream)
#   /slow/restaurant/{id}      the slow upstream, cached 60 s: the stampede
#   /expiring/restaurant/{id}  the slow upstream, cached 1 s + 60 s stale: expiry under load
#   /get_clv                   GET with a JSON body, keyed on customer_id, cached 1 h
#   /miss/restaurant/{id}, /limited/restaurant/{id}: the soak mix (1 s TTL; 200 requests/s)
# start_stoa NAME PORT ADMIN_PORT EXTRA_TOML HIT_ROUTE_EXTRA
start_stoa() {
  local name=$1 port=$2 admin=$3 extra=$4 route_extra=$5
  cat >"$work/$name.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
threads = $WORKERS
[admin]
listen = "127.0.0.1:$admin"
$extra
[rate_limits.tight]
requests_per_second = 200
burst = 200
[upstreams.restaurants]
url = "http://127.0.0.1:$UP_PORT"
[upstreams.origin]
url = "$API_UPSTREAM"
[upstreams.slow]
url = "http://127.0.0.1:$SLOW_PORT"
timeout = "10s"
[upstreams.clv]
url = "http://127.0.0.1:$CLV_PORT"
timeout = "10s"
[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "60s", stale_while_revalidate = "60s" }
$route_extra
[[routes]]
name = "api"
methods = ["GET"]
path = "/api/{*rest}"
upstream = "origin"
[[routes]]
name = "slow"
methods = ["GET"]
path = "/slow/restaurant/{id}"
upstream = "slow"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "60s", stale_while_revalidate = "60s" }
[[routes]]
name = "expiring"
methods = ["GET"]
path = "/expiring/restaurant/{id}"
upstream = "slow"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "1s", stale_while_revalidate = "60s" }
[[routes]]
name = "clv"
methods = ["GET"]
path = "/get_clv"
upstream = "clv"
cache = { ttl = "1h", key_body = ["customer_id"] }
[[routes]]
name = "miss"
methods = ["GET"]
path = "/miss/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "1s" }
[[routes]]
name = "limited"
methods = ["GET"]
path = "/limited/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
rate_limit = "tight"
cache = { ttl = "60s" }
TOML
  ./target/release/stoa check --config "$work/$name.toml" >"$work/$name.check" 2>&1 \
    || { cat "$work/$name.check" >&2; die "the generated configuration of $name is invalid"; }
  # The log level is in the file ([log] level): RUST_LOG would override it.
  env -u RUST_LOG ./target/release/stoa --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
  pids+=($!)
  eval "${name}_pid=$!"
  wait_for "stoa ($name)" "http://127.0.0.1:$admin/readyz" $! "$work/$name.log"
}
# The main contender: metrics on, access log off (as nginx below: access_log off).
start_stoa stoa "$STOA_PORT" "$STOA_ADMIN" $'[log]\nlevel = "warn"\naccess_log = false' ""


# Observability cost: metrics and access log both off / both on (JSON lines to a file).
start_stoa bare "$BARE_PORT" "$BARE_ADMIN" $'metrics = false\n[log]\nlevel = "warn"\naccess_log = false' ""
ACCESS_FILE=$work/logged-access.log
start_stoa logged "$LOGGED_PORT" "$LOGGED_ADMIN" \
  "$(printf '[log]\naccess_log = true\nformat = "json"\nlevel = "info"\naccess_log_file = "%s"' "$ACCESS_FILE")" ""
# Rate-limit cost: a generous per-client policy on the route.
start_stoa limited "$LIMITED_PORT" "$LIMITED_ADMIN" \
  $'[log]\nlevel = "warn"\naccess_log = false\n[rate_limits.generous]\nrequests_per_second = 1000000\nburst = 1000000' \
  'rate_limit = "generous"'

# --- nginx ----------------------------------------------------------------------------
mkdir -p "$work/nginx/cache" "$work/nginx/tmp"
chmod -R 777 "$work/nginx"
body=$(c "http://127.0.0.1:$STOA_PORT/restaurant/dufva")
case $body in *'$'*) die "the static body contains a '\$', which nginx's return cannot carry" ;; esac
static_body=$(printf '%s' "$body" | sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g")
# Shared by every cached location: one fetch per key (lock), stale while one refresh runs.
cat >"$work/nginx-cache.conf" <<NGINX
proxy_http_version 1.1;
proxy_set_header Connection "";
proxy_cache stoa;
proxy_cache_lock on;
proxy_cache_use_stale updating error timeout;
proxy_cache_background_update on;
add_header X-Cache \$upstream_cache_status;
NGINX
cat >"$work/nginx.conf" <<NGINX
worker_processes $WORKERS;
pid $work/nginx.pid;
error_log $work/nginx/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/tmp;
  proxy_temp_path $work/nginx/tmp;
  proxy_cache_path $work/nginx/cache levels=1:2 keys_zone=stoa:10m max_size=256m inactive=10m;
  upstream restaurants { server 127.0.0.1:$UP_PORT; keepalive 64; }
  upstream slow { server 127.0.0.1:$SLOW_PORT; keepalive 64; }
  upstream clv { server 127.0.0.1:$CLV_PORT; keepalive 64; }
  upstream origin { server ${API_UPSTREAM#http://}; keepalive 64; }
  limit_req_zone \$binary_remote_addr zone=tight:1m rate=200r/s;
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location /restaurant/ {
      proxy_pass http://restaurants/api/restaurant/;
      proxy_set_header Host 127.0.0.1:$UP_PORT;
      include $work/nginx-cache.conf;
      proxy_cache_valid 200 60s;
    }
    location /api/ {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host ${API_UPSTREAM#http://};
    }
    # The soak mix: a 1 s TTL over rotating keys, and a route limited to 200 requests/s.
    location /miss/restaurant/ {
      proxy_pass http://restaurants/api/restaurant/;
      proxy_set_header Host 127.0.0.1:$UP_PORT;
      include $work/nginx-cache.conf;
      proxy_cache_valid 200 1s;
    }
    location /limited/restaurant/ {
      limit_req zone=tight burst=200 nodelay;
      limit_req_status 429;
      proxy_pass http://restaurants/api/restaurant/;
      proxy_set_header Host 127.0.0.1:$UP_PORT;
      include $work/nginx-cache.conf;
      proxy_cache_valid 200 60s;
    }
    location /slow/restaurant/ {
      proxy_pass http://slow/api/restaurant/;
      proxy_set_header Host 127.0.0.1:$SLOW_PORT;
      include $work/nginx-cache.conf;
      proxy_cache_valid 200 60s;
    }
    location /expiring/restaurant/ {
      proxy_pass http://slow/api/restaurant/;
      proxy_set_header Host 127.0.0.1:$SLOW_PORT;
      include $work/nginx-cache.conf;
      proxy_cache_valid 200 1s;
    }
    location = /get_clv {
      # The key holds the body: nginx reads the whole body (into memory, it fits in
      # client_body_buffer_size) before it computes the key, so \$request_body is set.
      client_body_buffer_size 64k;
      client_max_body_size 64k;
      proxy_pass http://clv;
      proxy_set_header Host 127.0.0.1:$CLV_PORT;
      include $work/nginx-cache.conf;
      proxy_cache_key "\$request_method|\$request_uri|\$request_body";
      proxy_cache_valid 200 1h;
    }
    location = /static {
      default_type application/json;
      return 200 '$static_body';
    }
  }
}
NGINX
"$NGINX" -t -p "$work/nginx" -c "$work/nginx.conf" >"$work/nginx-t.out" 2>&1 \
  || { cat "$work/nginx-t.out" >&2; die "nginx rejected the generated configuration"; }
"$NGINX" -p "$work/nginx" -c "$work/nginx.conf" >"$work/nginx.out" 2>&1 &
pids+=($!); nginx_pid=$!; wait_for nginx "http://127.0.0.1:$NGINX_PORT/static" $! "$work/nginx.out"

# ======================================================================================
# Soak: stoa and nginx in turn, steady mixed load, p99, RSS and CPU per request every 10 s.
# ======================================================================================
if [ -n "$SOAK" ]; then
  base=http://127.0.0.1:$STOA_PORT
  for id in bikupan dufva glada haga hjulet hubben jons jorpes livet nanna rudbeck svarta tallrik; do
    c -o /dev/null "$base/restaurant/$id"
  done
  # Samples alternate between stoa and nginx (the reference: same mix, same upstream), so a
  # drift both show is the machine's, not stoa's.
  samples=$((SOAK_S / 20))
  nbase=http://127.0.0.1:$NGINX_PORT
  for id in bikupan dufva glada haga hjulet hubben jons jorpes livet nanna rudbeck svarta tallrik; do
    c -o /dev/null "$nbase/restaurant/$id"
  done
  echo "soak: $samples x 10 s of wrk -t$THREADS -c$CONNECTIONS -s loadtest/soak.lua against stoa, each followed" \
       "by 10 s against nginx (4/10 hits, 2/10 misses, 2/10 pass-through, 2/10 over a 200/s limit); $(nproc) cores" >&2
  printf '%6s %-6s %12s %9s %9s %10s %10s %12s\n' "t s" server "requests/s" "p50 ms" "p99 ms" "non-2xx" "RSS MiB" "CPU us/req"
  declare -A soak_base=([stoa]=$base [nginx]=$nbase) soak_pid=([stoa]=$stoa_pid [nginx]=$nginx_pid)
  for i in $(seq 1 "$samples"); do
    for t in stoa nginx; do
      cpu_before=$(cpu_us "${soak_pid[$t]}")
      out=$(timeout 40 wrk -t"$THREADS" -c"$CONNECTIONS" -d10s --latency -s "$LOADTEST/soak.lua" "${soak_base[$t]}" 2>&1) \
        || { echo "$out" >&2; die "wrk failed during the soak"; }
      cpu_after=$(cpu_us "${soak_pid[$t]}")
      read -r rps p50 p99 bad n errs < <(printf '%s\n' "$out" | awk '
        function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /m$/) return v*60000; if (v ~ /s$/) return v*1000; return v }
        /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 }
        / requests in / { n = $1 } /Non-2xx/ { bad = $NF } /Socket errors/ { errs = $0 }
        END { gsub(/[ ,]+/, "_", errs); printf "%s %.3f %.3f %d %d %s\n", rps, p50, p99, bad, n, (errs == "" ? "-" : errs) }')
      cpu_req=$(awk -v d=$((cpu_after - cpu_before)) -v n="$n" 'BEGIN { printf "%.1f", (n > 0 ? d / n : 0) }')
      kill -0 "${soak_pid[$t]}" 2>/dev/null || { tail -n 30 "$work/$t.log" >&2; die "$t exited during the soak"; }
      # RSS of the process and its children (nginx's workers).
      rss_kb=$(for p in "${soak_pid[$t]}" $(pgrep -P "${soak_pid[$t]}"); do awk '/^VmRSS/ { print $2 }' "/proc/$p/status"; done | awk '{ s += $1 } END { print s }')
      printf '%6d %-6s %12.0f %9.3f %9.3f %10d %10.1f %12s\n' $((i * 20)) "$t" "$rps" "$p50" "$p99" "$bad" "$(echo "$rss_kb" | awk '{ print $1 / 1024 }')" "$cpu_req"
      [ "$errs" = "-" ] || echo "  wrk ($t): $errs" >&2
      rec soak "$t" "$i" rps "$rps"; rec soak "$t" "$i" p99 "$p99"; rec soak "$t" "$i" rss_kb "$rss_kb"
      rec soak "$t" "$i" non2xx "$bad"; rec soak "$t" "$i" cpu_us "$cpu_req"
    done
  done
  python3 "$LOADTEST/report.py" soak "$results"
  exit 0
fi

# --- Varnish ----------------------------------------------------------------------------
VARNISH_BODY=0
if [ "$HAVE_VARNISH" = 1 ]; then
  mkdir -p "$work/varnish"
  # GET bodies: std.cache_req_body keeps the body (so it also reaches the backend on a
  # miss) and vmod bodyaccess (Debian: varnish-modules) puts it in the hash.
  printf 'vcl 4.1;\nimport std;\nimport bodyaccess;\nbackend b { .host = "127.0.0.1"; .port = "%s"; }\n' \
    "$UP_PORT" >"$work/probe.vcl"
  "$VARNISHD" -C -f "$work/probe.vcl" -n "$work/varnish-probe" >/dev/null 2>&1 && VARNISH_BODY=1
  if [ "$VARNISH_BODY" = 1 ]; then
    v_import='import bodyaccess;'
    v_clv='if (!std.cache_req_body(64KB)) { return (synth(413)); } return (hash);'
    v_hash='if (req.url ~ "^/get_clv") { bodyaccess.hash_req_body(); }'
  else
    v_import=''; v_clv='return (pass);'; v_hash=''
    note "Varnish: vmod bodyaccess not available (Debian package varnish-modules), so it cannot key on a GET body: CLV is N/A."
  fi
  cat >"$work/stoa.vcl" <<VCL
vcl 4.1;
import std;
$v_import
backend restaurants { .host = "127.0.0.1"; .port = "$UP_PORT"; }
backend slow { .host = "127.0.0.1"; .port = "$SLOW_PORT"; .first_byte_timeout = 10s; }
backend clv { .host = "127.0.0.1"; .port = "$CLV_PORT"; .first_byte_timeout = 10s; }
backend origin { .host = "127.0.0.1"; .port = "$ORIGIN_PORT"; }

sub vcl_recv {
  unset req.http.x-ttl;
  if (req.url ~ "^/restaurant/") {
    set req.backend_hint = restaurants;
    set req.url = regsub(req.url, "^/restaurant/", "/api/restaurant/");
    set req.http.x-ttl = "60s";
    return (hash);
  }
  if (req.url ~ "^/api/") {
    set req.backend_hint = origin;
    return (pass);
  }
  if (req.url ~ "^/slow/restaurant/") {
    set req.backend_hint = slow;
    set req.url = regsub(req.url, "^/slow/restaurant/", "/api/restaurant/");
    set req.http.x-ttl = "60s";
    return (hash);
  }
  if (req.url ~ "^/expiring/restaurant/") {
    set req.backend_hint = slow;
    set req.url = regsub(req.url, "^/expiring/restaurant/", "/api/restaurant/");
    set req.http.x-ttl = "1s";
    return (hash);
  }
  if (req.url ~ "^/get_clv") {
    set req.backend_hint = clv;
    set req.http.x-ttl = "1h";
    $v_clv
  }
  return (synth(404));
}

sub vcl_hash {
  # The rewritten URL alone would make /slow/... and /expiring/... share entries.
  hash_data(req.http.x-ttl);
  $v_hash
}

sub vcl_backend_response {
  if (bereq.http.x-ttl) {
    set beresp.ttl = std.duration(bereq.http.x-ttl, 60s);
    set beresp.grace = 60s;     # stale while one background fetch runs
  }
}

sub vcl_deliver {
  if (obj.hits > 0) { set resp.http.X-Cache = "HIT"; } else { set resp.http.X-Cache = "MISS"; }
}
VCL
  # -j none: no privilege separation (works as root and as a user). Threads: enough idle
  # workers for the 1,000-client stampede (with the default 2 x 100 its sessions queue for
  # a thread).
  "$VARNISHD" -F -j none -a "127.0.0.1:$VARNISH_PORT" -T none -f "$work/stoa.vcl" -s malloc,256m \
    -n "$work/varnish" -p listen_depth=4096 -p thread_pool_min=600 -p thread_pool_max=5000 \
    >"$work/varnish.log" 2>&1 &
  pids+=($!); varnish_pid=$!; wait_for varnish "http://127.0.0.1:$VARNISH_PORT/restaurant/dufva" $! "$work/varnish.log" 30
else
  note "Varnish: not installed (apt-get install varnish varnish-modules): its column is N/A."
fi

declare -A url_of=([stoa]=http://127.0.0.1:$STOA_PORT [nginx]=http://127.0.0.1:$NGINX_PORT
  [varnish]=http://127.0.0.1:$VARNISH_PORT [bare]=http://127.0.0.1:$BARE_PORT
  [logged]=http://127.0.0.1:$LOGGED_PORT [limited]=http://127.0.0.1:$LIMITED_PORT
  [floor]=http://127.0.0.1:$FLOOR_PORT [lean]=http://127.0.0.1:$LEAN_PORT
  [raw]=http://127.0.0.1:$RAW_PORT
  [origin]=http://127.0.0.1:$ORIGIN_PORT)
# Whose CPU time a run on each target costs (the static ceiling is the same nginx).
declare -A pid_of=([stoa]=$stoa_pid [nginx]=$nginx_pid [static]=$nginx_pid [bare]=$bare_pid
  [logged]=$logged_pid [limited]=$limited_pid [floor]=$floor_pid [lean]=$lean_pid
  [raw]=$raw_pid
  [origin]=$origin_pid)
[ "$HAVE_VARNISH" = 1 ] && pid_of[varnish]=$varnish_pid
peers=(stoa nginx); [ "$HAVE_VARNISH" = 1 ] && peers+=(varnish)

# --- measure --------------------------------------------------------------------------
# wrk_run URL SECONDS [wrk args...]: "requests/s p50_ms p99_ms non2xx socket_errors requests"
wrk_run() {
  local url=$1 s=$2; shift 2
  local out
  out=$(timeout $((s + 30)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${s}s" --latency "$@" "$url" 2>&1) \
    || { echo "$out" >&2; die "wrk failed on $url"; }
  printf '%s\n' "$out" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /m$/) return v*60000; if (v ~ /s$/) return v*1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /^Requests\/sec/ { rps = $2 }
    /Non-2xx/ { bad = $NF }
    /Socket errors/ { gsub(/,/, ""); errs = $4 + $6 + $8 + $10 }
    / requests in / { n = $1 }
    END { printf "%s %.3f %.3f %d %d %d\n", rps, p50, p99, bad, errs, n }'
}
# hit SCENARIO TARGET ROUND URL [wrk args...]: one wrk run, recorded.
hit() {
  local scen=$1 target=$2 round=$3 url=$4; shift 4
  local rps p50 p99 bad errs n cpu0 cpu1 pid=${pid_of[$target]:-}
  [ -n "$pid" ] && cpu0=$(cpu_us "$pid")
  read -r rps p50 p99 bad errs n <<<"$(wrk_run "$url" "$DURATION_S" "$@")"
  rec "$scen" "$target" "$round" rps "$rps"; rec "$scen" "$target" "$round" p50 "$p50"
  rec "$scen" "$target" "$round" p99 "$p99"; rec "$scen" "$target" "$round" requests "$n"
  rec "$scen" "$target" "$round" socket_errors "$errs"
  if [ -n "$pid" ] && [ "$n" -gt 0 ]; then
    cpu1=$(cpu_us "$pid")
    rec "$scen" "$target" "$round" cpu_us "$(awk -v c=$((cpu1 - cpu0)) -v n="$n" 'BEGIN { printf "%.2f", c / n }')"
  fi
  if [ "$bad" != 0 ] || [ "$errs" != 0 ]; then
    note "$scen, $target, round $round: $bad non-2xx answers, $errs socket errors"
  fi
}

cores=$(nproc)
echo "stoa, nginx$([ "$HAVE_VARNISH" = 1 ] && echo ", Varnish") on 127.0.0.1; $cores cores;" \
     "wrk -t$THREADS -c$CONNECTIONS, $ROUNDS round(s) of ${DURATION_S}s per server; $WORKERS workers each" >&2

# Same answer everywhere? (sizes differ only if a Host header or a port leaks into the body)
for t in "${peers[@]}"; do
  c -o /dev/null "${url_of[$t]}/restaurant/dufva"
  size=$(c "${url_of[$t]}/restaurant/dufva" | wc -c)
  rec info "$t" 0 body_bytes "$size"
done

# 1. Cache hits on one key, the static ceiling and stoa's variants; servers interleaved.
echo "1/5 cache hits ($((ROUNDS * (${#peers[@]} + 4) * DURATION_S))s)" >&2
hit_targets=("${peers[@]}" static bare logged limited)
for t in bare logged limited; do c -o /dev/null "${url_of[$t]}/restaurant/dufva"; c -o /dev/null "${url_of[$t]}/restaurant/dufva"; done
access_lines() { sleep 0.2; wc -l <"$ACCESS_FILE" 2>/dev/null || echo 0; }
for r in $(seq 1 "$ROUNDS"); do
  for t in "${hit_targets[@]}"; do
    if [ "$t" = static ]; then hit hit static "$r" "http://127.0.0.1:$NGINX_PORT/static"
    elif [ "$t" = logged ]; then
      before=$(access_lines)
      hit hit "$t" "$r" "${url_of[$t]}/restaurant/dufva"
      rec hit logged "$r" access_lines $(( $(access_lines) - before ))
    else hit hit "$t" "$r" "${url_of[$t]}/restaurant/dufva"; fi
  done
done
dropped=$(c "http://127.0.0.1:$LOGGED_ADMIN/metrics" | awk '/^stoa_access_log_dropped_total / { print $2 }')
rec hit logged 0 access_dropped "${dropped:-0}"

# 1b. The same cache hits measured by oha, a second client, when it is installed.
if [ "$HAVE_OHA" = 1 ]; then
  echo "1b/5 cache hits with oha ($((ROUNDS * ${#peers[@]} * DURATION_S))s)" >&2
  for r in $(seq 1 "$ROUNDS"); do
    for t in "${peers[@]}"; do
      out=$(timeout $((DURATION_S + 30)) "$OHA" -z "${DURATION_S}s" -c "$CONNECTIONS" --no-tui \
              --output-format json "${url_of[$t]}/restaurant/dufva" 2>"$work/oha.err") \
        || { cat "$work/oha.err" >&2; die "oha failed on ${url_of[$t]}"; }
      read -r rps p50 p99 bad <<<"$(printf '%s' "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution") or {}
bad = sum(n for code, n in codes.items() if not code.startswith("2"))
print(d["summary"]["requestsPerSec"], p["p50"] * 1000, p["p99"] * 1000, bad)')"
      rec hit_oha "$t" "$r" rps "$rps"; rec hit_oha "$t" "$r" p50 "$p50"; rec hit_oha "$t" "$r" p99 "$p99"
      [ "$bad" = 0 ] || note "oha cache hits, $t, round $r: $bad non-2xx answers"
    done
  done
else
  note "oha not installed (cargo install oha --locked): the oha rows are N/A."
fi

# 1c. Pipelined: PIPELINE_DEPTH requests written at once on each connection, cache hits and
# pass-through; every answer counts (a server that answers one and closes shows errors).
echo "1c/5 pipelined, depth $PIPELINE_DEPTH ($((ROUNDS * ${#peers[@]} * 2 * DURATION_S))s)" >&2
for r in $(seq 1 "$ROUNDS"); do
  for t in "${peers[@]}"; do
    PIPELINE_DEPTH=$PIPELINE_DEPTH hit pipe_hit "$t" "$r" "${url_of[$t]}/restaurant/dufva" -s "$LOADTEST/pipeline.lua"
    PIPELINE_DEPTH=$PIPELINE_DEPTH hit pipe_pass "$t" "$r" "${url_of[$t]}/api/restaurant/dufva" -s "$LOADTEST/pipeline.lua"
  done
done

# 2. Pass-through: no cache, every request reaches the upstream over a kept-alive connection.
# Each round also measures the floor, its lean and raw paths and the origin alone (it must not
# be the bottleneck).
echo "2/5 pass-through ($((ROUNDS * (${#peers[@]} + 4) * DURATION_S))s)" >&2
for r in $(seq 1 "$ROUNDS"); do
  for t in "${peers[@]}" floor lean raw origin; do
    hit pass "$t" "$r" "${url_of[$t]}/api/restaurant/dufva"
  done
done

# 3. Stampede: STAMPEDE_CLIENTS clients, one cold key each round, the slow upstream.
echo "3/5 stampede: $STAMPEDE_CLIENTS clients on a cold key, $UPSTREAM_LATENCY upstream" >&2
stampede_client=$work/stampede-$$
for r in $(seq 1 "$ROUNDS"); do
  for t in "${peers[@]}"; do
    key="dufva?cold=$t-$r-$RANDOM$RANDOM"
    reset_stats "$SLOW_PORT"
    line=$(timeout 60 python3 "$LOADTEST/stampede.py" --clients "$STAMPEDE_CLIENTS" --timeout 30 \
             "${url_of[$t]}/slow/restaurant/$key" 2>"$stampede_client.err") \
      || note "stampede, $t, round $r: $(cat "$stampede_client.err" 2>/dev/null | tail -n 1) $line"
    sleep 0.3   # a straggling fetch would still be counted
    rec stampede "$t" "$r" upstream_calls "$(upstream_stat "$SLOW_PORT" total)"
    for kv in $line; do
      case $kv in
        p50_ms=*) rec stampede "$t" "$r" p50 "${kv#*=}" ;;
        p99_ms=*) rec stampede "$t" "$r" p99 "${kv#*=}" ;;
        failed=*) [ "${kv#*=}" = 0 ] || rec stampede "$t" "$r" failed "${kv#*=}" ;;
      esac
    done
    if [ "$HAVE_HEY" = 1 ]; then
      # The same with hey: each client connects and sends at once (connect time included).
      key="dufva?cold=hey-$t-$r-$RANDOM$RANDOM"
      reset_stats "$SLOW_PORT"
      out=$(timeout 60 hey -n "$STAMPEDE_CLIENTS" -c "$STAMPEDE_CLIENTS" -t 30 \
              "${url_of[$t]}/slow/restaurant/$key" 2>&1) || note "hey stampede, $t, round $r failed"
      sleep 0.3
      rec stampede_hey "$t" "$r" upstream_calls "$(upstream_stat "$SLOW_PORT" total)"
      p99=$(printf '%s\n' "$out" | awk '/ 99% in / { printf "%.1f", $3 * 1000 }')
      [ -n "$p99" ] && rec stampede_hey "$t" "$r" p99 "$p99"
      ok=$(printf '%s\n' "$out" | awk '/\[200\]/ { print $2 }')
      [ "${ok:-0}" = "$STAMPEDE_CLIENTS" ] || note "hey stampede, $t, round $r: ${ok:-0} of $STAMPEDE_CLIENTS answered 200"
    fi
  done
done
[ "$HAVE_HEY" = 1 ] || note "hey not installed: the hey stampede row is N/A."

# 4. Expiry under load: 1 s TTL, EXPIRY_DURATION of wrk on that one key, slow upstream.
echo "4/5 expiry under load: ${EXPIRY_S}s per server" >&2
for t in "${peers[@]}"; do
  c -o /dev/null "${url_of[$t]}/expiring/restaurant/dufva"
  sleep 0.3
  reset_stats "$SLOW_PORT"
  read -r rps p50 p99 bad errs _ <<<"$(wrk_run "${url_of[$t]}/expiring/restaurant/dufva" "$EXPIRY_S")"
  rec expiry "$t" 1 rps "$rps"; rec expiry "$t" 1 p50 "$p50"; rec expiry "$t" 1 p99 "$p99"
  [ "$bad" = 0 ] && [ "$errs" = 0 ] || note "expiry, $t: $bad non-2xx answers, $errs socket errors"
  sleep 0.5   # let a refresh started in the last moments land
  calls=$(upstream_stat "$SLOW_PORT" total)
  rec expiry "$t" 1 upstream_calls "$calls"
  rec expiry "$t" 1 calls_per_window "$(awk -v n="$calls" -v s="$EXPIRY_S" 'BEGIN { printf "%.2f", n / s }')"
  rec expiry "$t" 1 max_in_flight "$(upstream_stat "$SLOW_PORT" max_in_flight)"
done

# 5. GET with a JSON body (CLV), cache hits. First check that each server keys on the body.
echo "5/5 GET with a JSON body (CLV) hits" >&2
clv_a='{"customer_id": "450e1c2cbd21687780153995f1be0c23"}'
clv_b='{"customer_id": "06b730289423c11e41d9a819652443cd"}'
clv_ok=()
for t in "${peers[@]}"; do
  if [ "$t" = varnish ] && [ "$VARNISH_BODY" = 0 ]; then continue; fi
  reset_stats "$CLV_PORT"
  good=1
  for pass in 1 2; do
    for b in "$clv_a" "$clv_b"; do
      id=${b#*: \"}; id=${id%\"\}}
      answer=$(c -X GET -H 'Content-Type: application/json' -d "$b" "${url_of[$t]}/get_clv") || good=0
      case $answer in *"$id"*) ;; *) good=0 ;; esac
    done
  done
  calls=$(upstream_stat "$CLV_PORT" total)
  if [ "$good" = 1 ] && [ "$calls" = 2 ]; then
    clv_ok+=("$t")
  else
    note "CLV, $t: does not key on the body (two bodies, twice each: $calls upstream calls, right answers: $good): N/A."
  fi
done
for r in $(seq 1 "$ROUNDS"); do
  for t in "${clv_ok[@]}"; do
    hit clv "$t" "$r" "${url_of[$t]}/get_clv" -s "$LOADTEST/clv.lua"
  done
done

echo >&2
python3 "$LOADTEST/report.py" compare "$results" "$notes" \
  "wrk -t$THREADS -c$CONNECTIONS; $ROUNDS round(s) of ${DURATION_S}s per server, interleaved; $WORKERS workers each (floor: $FLOOR_MODEL); pass-through origin: nginx static file, $ORIGIN_WORKERS worker(s); $cores cores; stampede $STAMPEDE_CLIENTS clients, upstream $UPSTREAM_LATENCY; expiry ${EXPIRY_S}s at 1 s TTL"
