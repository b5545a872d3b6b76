#!/usr/bin/env bash
# The shared cache tier ([cluster]) under load, on loopback:
#   1. hits on an L1-warm key: one stoa with [cluster] against one without (the tier's cost on
#      the hot path; target: within 5 %), wrk, ROUNDS [3] interleaved rounds, medians of
#      requests/s and CPU µs per request;
#   2. L2-hit latency: a key fetched through node A, then asked of node B (B reads Redis and
#      promotes), curl's time_total over KEYS keys;
#   3. three-node stampede: STAMPEDE_CLIENTS clients on one cold key spread over three
#      instances, upstream calls counted by the demo upstream: three stoa on one Redis, three
#      nginx (proxy_cache_lock, each its own cache) and three Varnish (each its own cache).
#
#   loadtest/cluster.sh            # DURATION [5s] per wrk run
#   loadtest/cluster.sh --quick    # 2 s per wrk run
#
# Needs redis-server, wrk, curl, python3, nginx, varnishd (scripts/install-deps.sh and
# loadtest/compare.sh install them); builds stoa and stoa-demo in release mode unless NO_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
LOADTEST=$PWD/loadtest

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
[ "${1:-}" = --quick ] && DURATION=2s
CONNECTIONS=${CONNECTIONS:-50}
WORKERS=${WORKERS:-2}
KEYS=${KEYS:-200}
STAMPEDE_CLIENTS=${STAMPEDE_CLIENTS:-999}
UPSTREAM_LATENCY=${UPSTREAM_LATENCY:-200ms}
PORT_BASE=${PORT_BASE:-19300}

die() { echo "cluster.sh: $*" >&2; exit 1; }
for tool in redis-server wrk curl python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
VARNISHD=$(command -v varnishd || echo /usr/sbin/varnishd)

if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building stoa and stoa-demo (release)" >&2
  cargo build --release -q --workspace --bins
fi

REDIS_PORT=$((PORT_BASE + 1))
UP_PORT=$((PORT_BASE + 2))     # fast upstream: the hit rows
SLOW_PORT=$((PORT_BASE + 3))   # slow upstream: the stampede
SOLO_PORT=$((PORT_BASE + 4)); SOLO_ADMIN=$((PORT_BASE + 5))
node_port() { echo $((PORT_BASE + 10 + 2 * $1)); }
node_admin() { echo $((PORT_BASE + 11 + 2 * $1)); }
nginx_port() { echo $((PORT_BASE + 20 + $1)); }
varnish_port() { echo $((PORT_BASE + 30 + $1)); }

work=$(mktemp -d "${TMPDIR:-/tmp}/stoa-cluster.XXXXXX")
chmod 755 "$work"
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -f "$work/nginx-0.pid" ] && for i in 0 1 2; do
    kill "$(cat "$work/nginx-$i.pid" 2>/dev/null)" 2>/dev/null || true
  done
  for i in 0 1 2; do
    [ -f "$work/varnish-$i.pid" ] && kill "$(cat "$work/varnish-$i.pid")" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_for() {   # URL NAME
  for _ in $(seq 1 150); do
    curl -fsS -m 1 -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  die "$2 did not answer $1"
}
c() { curl -fsS -m 10 "$@"; }
reset_stats() { c -X POST -o /dev/null "http://127.0.0.1:$1/__stats/reset"; }
upstream_calls() {
  c "http://127.0.0.1:$1/__stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['total'])"
}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  >"$work/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done

./target/release/stoa-demo --only restaurants --restaurants "127.0.0.1:$UP_PORT" \
  >"$work/demo.log" 2>&1 &
pids+=($!)
./target/release/stoa-demo --only restaurants --restaurants "127.0.0.1:$SLOW_PORT" \
  --latency "restaurants=$UPSTREAM_LATENCY" >"$work/demo-slow.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$UP_PORT/__stats" "stoa-demo"
wait_for "http://127.0.0.1:$SLOW_PORT/__stats" "stoa-demo (slow)"

# start_stoa NAME PORT ADMIN CLUSTER_TOML
start_stoa() {
  cat >"$work/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$2"
threads = $WORKERS

[admin]
listen = "127.0.0.1:$3"

$4

[upstreams.fast]
url = "http://127.0.0.1:$UP_PORT"

[upstreams.slow]
url = "http://127.0.0.1:$SLOW_PORT"

[[routes]]
name = "hit"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "fast"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "60s" }

[[routes]]
name = "slow"
methods = ["GET"]
path = "/slow/restaurant/{id}"
upstream = "slow"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "60s", lock_timeout = "30s" }
EOF
  ./target/release/stoa --config "$work/$1.toml" >"$work/$1.log" 2>&1 &
  pids+=($!); last_pid=$!
  wait_for "http://127.0.0.1:$3/readyz" "$1"
}

cluster_toml() {
  printf '[cluster]\nredis = "redis://127.0.0.1:%s/0"\nnode_name = "%s"\n' "$REDIS_PORT" "$1"
}
start_stoa solo "$SOLO_PORT" "$SOLO_ADMIN" ""
solo_pid=$last_pid
for i in 0 1 2; do
  start_stoa "node-$i" "$(node_port $i)" "$(node_admin $i)" "$(cluster_toml "node-$i")"
  [ "$i" = 0 ] && node0_pid=$last_pid
done
for i in 0 1 2; do   # every node sees Redis up
  until c "http://127.0.0.1:$(node_admin $i)/metrics" | grep -q '^stoa_cluster_redis_up 1'; do
    sleep 0.1
  done
done

# cpu_ticks PID: user + system clock ticks PID has used so far (all its threads).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# hit_run URL PID: one wrk run; prints "requests/s CPU-µs-per-request".
hit_run() {
  local before after out
  before=$(cpu_ticks "$2")
  out=$(wrk -t 1 -c "$CONNECTIONS" -d "$DURATION" "$1")
  after=$(cpu_ticks "$2")
  python3 - "$before" "$after" "$out" "$(getconf CLK_TCK)" <<'PY'
import re, sys
before, after, out, hz = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
print(f"{rps:.0f} {(after - before) * 1e6 / hz / max(total, 1):.1f}")
PY
}
# median_of FIELD FILE: the median of a column.
median_of() { sort -n -k"$1" "$2" | awk -v f="$1" '{ v[NR] = $f } END { print v[int((NR + 1) / 2)] }'; }

echo "1/3 L1-warm hits, cluster off vs on ($ROUNDS interleaved rounds of $DURATION, $CONNECTIONS connections)" >&2
c -o /dev/null "http://127.0.0.1:$SOLO_PORT/restaurant/dufva"
c -o /dev/null "http://127.0.0.1:$(node_port 0)/restaurant/dufva"
: >"$work/hits-off.txt"; : >"$work/hits-on.txt"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="off on"; else order="on off"; fi
  for which in $order; do
    if [ "$which" = off ]; then
      hit_run "http://127.0.0.1:$SOLO_PORT/restaurant/dufva" "$solo_pid" >>"$work/hits-off.txt"
    else
      hit_run "http://127.0.0.1:$(node_port 0)/restaurant/dufva" "$node0_pid" >>"$work/hits-on.txt"
    fi
  done
done
off=$(median_of 1 "$work/hits-off.txt"); off_cpu=$(median_of 2 "$work/hits-off.txt")
on=$(median_of 1 "$work/hits-on.txt"); on_cpu=$(median_of 2 "$work/hits-on.txt")

echo "2/3 L2-hit latency over $KEYS keys" >&2
for k in $(seq 1 "$KEYS"); do
  c -o /dev/null "http://127.0.0.1:$(node_port 0)/restaurant/dufva?l2=$k"
done
for k in $(seq 1 "$KEYS"); do
  curl -fsS -m 10 -o /dev/null -w '%{time_total}\n' \
    "http://127.0.0.1:$(node_port 1)/restaurant/dufva?l2=$k"
done >"$work/l2.txt"
l2=$(sort -n "$work/l2.txt" | awk '{a[NR]=$1} END {printf "%.3f %.3f", a[int(NR*0.5)]*1000, a[int(NR*0.99)]*1000}')
c "http://127.0.0.1:$(node_admin 1)/metrics" | grep '^stoa_cache_l2_lookups_total' >"$work/l2-metrics.txt" || true

# --- nginx and Varnish: three instances each, each with its own cache --------------------
have_nginx=0; have_varnish=0
if [ -x "$NGINX" ]; then
  have_nginx=1
  for i in 0 1 2; do
    mkdir -p "$work/nginx-$i/cache"
    cat >"$work/nginx-$i.conf" <<EOF
worker_processes $WORKERS;
pid $work/nginx-$i.pid;
error_log $work/nginx-$i/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  proxy_cache_path $work/nginx-$i/cache keys_zone=c$i:10m;
  upstream slow { server 127.0.0.1:$SLOW_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$(nginx_port $i);
    location /slow/restaurant/ {
      proxy_pass http://slow/api/restaurant/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache c$i;
      proxy_cache_valid 200 60s;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 30s;
    }
  }
}
EOF
    "$NGINX" -p "$work/nginx-$i" -c "$work/nginx-$i.conf" -e "$work/nginx-$i/error.log"
  done
fi
if [ -x "$VARNISHD" ]; then
  have_varnish=1
  cat >"$work/default.vcl" <<EOF
vcl 4.1;
backend slow { .host = "127.0.0.1"; .port = "$SLOW_PORT"; }
sub vcl_recv {
  set req.url = regsub(req.url, "^/slow/restaurant/", "/api/restaurant/");
}
sub vcl_backend_response { set beresp.ttl = 60s; }
EOF
  for i in 0 1 2; do
    "$VARNISHD" -a "127.0.0.1:$(varnish_port $i)" -f "$work/default.vcl" -n "$work/varnish-$i" \
      -P "$work/varnish-$i.pid" -s malloc,64m
  done
fi

echo "3/3 stampede: $STAMPEDE_CLIENTS clients over three instances, $UPSTREAM_LATENCY upstream" >&2
# stampede NAME PORT_FN: upstream calls for one cold key asked of three instances at once
stampede() {
  local key="dufva?cold=$1-$RANDOM$RANDOM" per=$((STAMPEDE_CLIENTS / 3)) i spids=()
  reset_stats "$SLOW_PORT"
  for i in 0 1 2; do
    timeout 60 python3 "$LOADTEST/stampede.py" --clients "$per" --timeout 30 \
      "http://127.0.0.1:$($2 "$i")/slow/restaurant/$key" >"$work/stampede-$1-$i.txt" 2>&1 &
    spids+=($!)
  done
  local failed=0
  for p in "${spids[@]}"; do wait "$p" || failed=1; done
  sleep 0.3
  echo "$(upstream_calls "$SLOW_PORT") $failed"
}
stoa_calls=$(stampede stoa node_port)
nginx_calls="N/A"; varnish_calls="N/A"
if [ "$have_nginx" = 1 ]; then
  wait_for "http://127.0.0.1:$(nginx_port 0)/slow/restaurant/haga" nginx
  nginx_calls=$(stampede nginx nginx_port)
fi
if [ "$have_varnish" = 1 ]; then
  wait_for "http://127.0.0.1:$(varnish_port 0)/slow/restaurant/haga" varnish
  varnish_calls=$(stampede varnish varnish_port)
fi

echo
echo "row                                        value"
printf '%-42s %s\n' "L1-warm hits/s, cluster off (CPU us/req)" "$off ($off_cpu)"
printf '%-42s %s\n' "L1-warm hits/s, cluster on (CPU us/req)" "$on ($on_cpu)"
printf '%-42s %s\n' "rounds off / on (req/s CPU-us)" "$(paste -sd',' "$work/hits-off.txt") / $(paste -sd',' "$work/hits-on.txt")"
printf '%-42s %s\n' "cost of the tier on hits (target <= 5 %)" \
  "$(python3 -c "print(f'{(1 - $on / $off) * 100:.1f} %')")"
printf '%-42s %s\n' "L2-hit latency p50 / p99 ms (curl)" "$l2"
printf '%-42s %s\n' "stampede upstream calls, stoa x3 (failed?)" "$stoa_calls"
printf '%-42s %s\n' "stampede upstream calls, nginx x3" "$nginx_calls"
printf '%-42s %s\n' "stampede upstream calls, Varnish x3" "$varnish_calls"
cat "$work/l2-metrics.txt"
