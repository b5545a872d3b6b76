#!/usr/bin/env bash
# Side-by-side benchmark: stoa against nginx (proxy_cache + proxy_cache_lock) in front of
# the same demo upstream, same TTL, driven by the same wrk command, on loopback.
#
#   loadtest/compare.sh                 # cache-hit throughput and latency, ~1 minute
#   DURATION=30s CONNECTIONS=50 loadtest/compare.sh
#
# Installs what is missing (nginx, wrk) with apt-get, builds stoa in release mode, and
# tears everything down at the end. Prints one table with ratios stoa/nginx.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-1}
WORKERS=${WORKERS:-2}          # stoa threads and nginx worker processes alike

UP_PORT=19101; STOA_PORT=19102; STOA_ADMIN=19103; NGINX_PORT=19104

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release -q --workspace --bins

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() {
  for _ in $(seq 1 200); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for $1" >&2; return 1
}

# --- the upstream ---------------------------------------------------------------------
./target/release/stoa-demo --only restaurants --restaurants "127.0.0.1:$UP_PORT" >"$work/demo.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$UP_PORT/api/"

# --- stoa, in the variants compared ------------------------------------------------------
# start_stoa NAME PORT ADMIN_PORT EXTRA_TOML ROUTE_EXTRA
start_stoa() {
  local name=$1 port=$2 admin=$3 extra=$4 route_extra=$5
  cat >"$work/$name.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
threads = $WORKERS
[admin]
listen = "127.0.0.1:$admin"
$extra
[upstreams.restaurants]
url = "http://127.0.0.1:$UP_PORT"
[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "60s", stale_while_revalidate = "60s" }
$route_extra
TOML
  RUST_LOG=warn ./target/release/stoa --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$admin/readyz"
}
# The main contender: metrics on, access log off (as nginx below: access_log off).
start_stoa stoa "$STOA_PORT" "$STOA_ADMIN" $'[log]\naccess_log = false' ""
# Observability cost: metrics and access log both off / both on (JSON lines to a file).
start_stoa bare 19105 19106 $'metrics = false\n[log]\naccess_log = false' ""
start_stoa logged 19107 19108 $'[log]\naccess_log = true\nformat = "json"\nlevel = "info"' ""
# Rate-limit cost: a generous per-client policy on the route.
start_stoa limited 19109 19110 $'[log]\naccess_log = false\n[rate_limits.generous]\nrequests_per_second = 1000000\nburst = 1000000' 'rate_limit = "generous"'

# --- nginx ----------------------------------------------------------------------------
mkdir -p "$work/nginx/cache" "$work/nginx/tmp"
chmod -R 777 "$work/nginx"
body=$(curl -fsS "http://127.0.0.1:$UP_PORT/api/restaurant/dufva")
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
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location /restaurant/ {
      proxy_pass http://restaurants/api/restaurant/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache stoa;
      proxy_cache_valid 200 60s;
      proxy_cache_lock on;
      proxy_cache_use_stale updating error timeout;
      proxy_cache_background_update on;
      add_header X-Cache \$upstream_cache_status;
    }
    location = /static {
      default_type application/json;
      return 200 '$body';
    }
  }
}
NGINX
"$NGINX" -p "$work/nginx" -c "$work/nginx.conf" >"$work/nginx.out" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$NGINX_PORT/static"

# --- measure --------------------------------------------------------------------------
# Prints "requests/s p50_ms p99_ms" for one wrk run.
measure() {
  local url=$1
  curl -fsS -o /dev/null "$url"; curl -fsS -o /dev/null "$url"   # warm the cache
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$url" 2>&1 | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /^Requests\/sec/ { rps = $2 }
    /Non-2xx/ { bad = $NF }
    END { if (bad > 0) print "warning: " bad " non-2xx answers" > "/dev/stderr"; printf "%s %.3f %.3f\n", rps, p50, p99 }'
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION on a cached key; $WORKERS workers each; $(nproc) cores" >&2
read -r s_rps s_p50 s_p99 < <(measure "http://127.0.0.1:$STOA_PORT/restaurant/dufva")
read -r n_rps n_p50 n_p99 < <(measure "http://127.0.0.1:$NGINX_PORT/restaurant/dufva")
read -r c_rps c_p50 c_p99 < <(measure "http://127.0.0.1:$NGINX_PORT/static")
read -r b_rps b_p50 b_p99 < <(measure "http://127.0.0.1:19105/restaurant/dufva")
read -r l_rps l_p50 l_p99 < <(measure "http://127.0.0.1:19107/restaurant/dufva")
read -r r_rps r_p50 r_p99 < <(measure "http://127.0.0.1:19109/restaurant/dufva")
upstream_calls=$(curl -fsS "http://127.0.0.1:$UP_PORT/__stats" | sed -n 's/.*"total":\([0-9]*\).*/\1/p')

row() { printf '%-44s %12.0f %9.3f %9.3f\n' "$1" "$2" "$3" "$4"; }
printf '\n%-44s %12s %9s %9s\n' "cache hits, one key" "requests/s" "p50 ms" "p99 ms"
row "stoa (metrics on, access log off)" "$s_rps" "$s_p50" "$s_p99"
row "nginx proxy_cache (access log off)" "$n_rps" "$n_p50" "$n_p99"
row "nginx static return 200 (ceiling)" "$c_rps" "$c_p50" "$c_p99"
row "stoa, metrics and access log off" "$b_rps" "$b_p50" "$b_p99"
row "stoa, metrics and JSON access log on" "$l_rps" "$l_p50" "$l_p99"
row "stoa + generous per-client rate limit" "$r_rps" "$r_p50" "$r_p99"
awk -v s="$s_rps" -v n="$n_rps" -v c="$c_rps" -v sp="$s_p99" -v np="$n_p99" \
    -v b="$b_rps" -v l="$l_rps" -v r="$r_rps" 'BEGIN {
  printf "\nstoa/nginx requests/s: %.2fx   stoa/static: %.2fx   p99 stoa/nginx: %.2fx\n", s/n, s/c, (np > 0 ? sp/np : 0)
  printf "metrics+access log on / both off: %.2fx   rate limit on / off: %.2fx\n", l/b, r/s }'
echo "upstream calls during the whole run: $upstream_calls"
