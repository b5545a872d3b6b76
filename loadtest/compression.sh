#!/usr/bin/env bash
# Compressed cache hits side by side: stoa (variants compressed once, when stored) against
# nginx (proxy_cache with `gzip on`, which compresses every answer it sends) and Varnish
# (which stores the gzip form and sends it as stored), in front of the same upstream (a
# static ~30 KB JSON menu, the size of the answer issue 13 measured),
# with the same route and TTL, driven by the same client asking `Accept-Encoding: gzip, br`,
# on loopback. Prints requests/s and bytes on the wire per answer, with ratios.
#
#   loadtest/compression.sh             # 3 rounds of 5 s per server, servers interleaved
#   loadtest/compression.sh --quick     # a smoke run: 1 round of 2 s
#   DURATION=10s ROUNDS=5 loadtest/compression.sh
#
# Installs what is missing (nginx-light, varnish, wrk, curl, python3) with apt-get, builds
# stoa in release mode, and tears everything down at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: loadtest/compression.sh [--quick]

  (no flag)   cache hits of a ~30 KB JSON menu asked with Accept-Encoding: gzip, br:
              stoa vs nginx (gzip on) vs Varnish (stores gzip); requests/s and bytes
              on the wire per answer
  --quick     the same, short: 1 round of 2 s per server (no release build needed with
              NO_BUILD=1 BIN_DIR=target/debug)

environment (defaults in brackets):
  DURATION [5s]  ROUNDS [3]   one wrk run per server per round, servers interleaved
  CONNECTIONS [50]  THREADS [1]   wrk -t THREADS -c CONNECTIONS
  WORKERS [2]    stoa threads, nginx worker processes
  ACCEPT_ENCODING ["gzip, br"]   what the client asks for
  MENU_ITEMS [150]   dishes in the JSON menu (150: about 30 KB)
  NGINX_GZIP_LEVEL [1]   nginx's gzip_comp_level (1 is nginx's default)
  PORT_BASE [19200]  ports PORT_BASE+1 .. PORT_BASE+5 on 127.0.0.1
  NO_BUILD=1     use the stoa binary in BIN_DIR as it is
  BIN_DIR [target/release]   where stoa is
EOF
}

QUICK=0
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "compression.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  DURATION=${DURATION:-2s}; ROUNDS=${ROUNDS:-1}
fi
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-1}
WORKERS=${WORKERS:-2}
ACCEPT_ENCODING=${ACCEPT_ENCODING:-gzip, br}
NGINX_GZIP_LEVEL=${NGINX_GZIP_LEVEL:-1}
MENU_ITEMS=${MENU_ITEMS:-150}
PORT_BASE=${PORT_BASE:-19200}
BIN_DIR=${BIN_DIR:-target/release}

. loadtest/lib.sh

UP_PORT=$((PORT_BASE + 1))
STOA_PORT=$((PORT_BASE + 2)); STOA_ADMIN=$((PORT_BASE + 3))
NGINX_PORT=$((PORT_BASE + 4))
VARNISH_PORT=$((PORT_BASE + 5))

# --- what we need ---------------------------------------------------------------------
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v varnishd >/dev/null 2>&1 || [ -x /usr/sbin/varnishd ] || need+=(varnish)
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
[ -x "$NGINX" ] || die "nginx is required (apt-get install nginx-light)"
HAVE_VARNISH=0; [ -x "$VARNISHD" ] && HAVE_VARNISH=1

if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building stoa (cargo build --release --bin stoa)" >&2
  cargo build --release -q --bin stoa
fi
[ -x "$BIN_DIR/stoa" ] || die "$BIN_DIR/stoa is missing"

# --- processes and teardown ------------------------------------------------------------
start_work compression

ports_free $UP_PORT $STOA_PORT $STOA_ADMIN $NGINX_PORT $VARNISH_PORT

c() { curl -fsS -m 10 "$@"; }
results=$work/results.tsv
: >"$results"
rec() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$results"; }   # target round metric value

# --- the upstream: a static JSON menu (asked only on misses) -----------------------------
mkdir -p "$work/origin/api/restaurant"
python3 - "$work/origin/api/restaurant/menu.json" "$MENU_ITEMS" <<'PY'
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
kinds = ["soup", "salad", "pasta", "curry", "stew", "pie", "bowl", "wrap"]
menu = {"restaurant": "dufva", "week": 48, "currency": "SEK", "dishes": [
    {"id": i, "day": ["mon", "tue", "wed", "thu", "fri"][i % 5],
     "name": f"{kinds[i % 8]} of the day number {i}", "price": 95 + i % 40,
     "vegetarian": i % 3 == 0, "allergens": ["gluten", "milk", "egg"][: i % 4],
     "description": f"A {kinds[(i * 7) % 8]} with seasonal vegetables, served with bread ({i})"}
    for i in range(n)]}
open(path, "w").write(json.dumps(menu))
PY
python3 -m http.server --bind 127.0.0.1 --directory "$work/origin" "$UP_PORT" >"$work/origin.log" 2>&1 &
pids+=($!); wait_for "origin (python3 http.server)" "http://127.0.0.1:$UP_PORT/api/restaurant/menu.json" $! "$work/origin.log"

# --- stoa: the route cached 60 s, compression as configured by default ------------------
cat >"$work/stoa.toml" <<TOML
[server]
listen = "127.0.0.1:$STOA_PORT"
threads = $WORKERS
[admin]
listen = "127.0.0.1:$STOA_ADMIN"
[log]
access_log = false
[cache.compression]
encodings = ["br", "zstd", "gzip"]
[upstreams.restaurants]
url = "http://127.0.0.1:$UP_PORT"
[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "60s", stale_while_revalidate = "60s" }
TOML
"$BIN_DIR/stoa" check --config "$work/stoa.toml" >"$work/stoa.check" 2>&1 \
  || { cat "$work/stoa.check" >&2; die "the generated stoa configuration is invalid"; }
RUST_LOG=warn "$BIN_DIR/stoa" --config "$work/stoa.toml" >"$work/stoa.log" 2>&1 &
pids+=($!); wait_for stoa "http://127.0.0.1:$STOA_ADMIN/readyz" $! "$work/stoa.log"

# --- nginx: proxy_cache, gzip on (compresses each answer as it is sent) -----------------
mkdir -p "$work/nginx/cache" "$work/nginx/tmp"
chmod -R 777 "$work/nginx"
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
  gzip on;
  gzip_comp_level $NGINX_GZIP_LEVEL;
  gzip_min_length 1024;
  gzip_proxied any;
  gzip_vary on;
  gzip_types application/json;
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location /restaurant/ {
      proxy_pass http://restaurants/api/restaurant/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$UP_PORT;
      proxy_set_header Accept-Encoding "";
      proxy_cache stoa;
      proxy_cache_lock on;
      proxy_cache_use_stale updating error timeout;
      proxy_cache_background_update on;
      proxy_cache_valid 200 60s;
      add_header X-Cache \$upstream_cache_status;
    }
    location = /ready { return 200 'ok'; }
  }
}
NGINX
"$NGINX" -t -p "$work/nginx" -c "$work/nginx.conf" >"$work/nginx-t.out" 2>&1 \
  || { cat "$work/nginx-t.out" >&2; die "nginx rejected the generated configuration"; }
"$NGINX" -p "$work/nginx" -c "$work/nginx.conf" >"$work/nginx.out" 2>&1 &
pids+=($!); wait_for nginx "http://127.0.0.1:$NGINX_PORT/ready" $! "$work/nginx.out"

# --- Varnish: stores the gzip form (do_gzip), sends it to clients that accept gzip ------
if [ "$HAVE_VARNISH" = 1 ]; then
  mkdir -p "$work/varnish"
  cat >"$work/stoa.vcl" <<VCL
vcl 4.1;
backend restaurants { .host = "127.0.0.1"; .port = "$UP_PORT"; }
sub vcl_recv {
  if (req.url ~ "^/restaurant/") {
    set req.backend_hint = restaurants;
    set req.url = regsub(req.url, "^/restaurant/", "/api/restaurant/");
    return (hash);
  }
  return (synth(404));
}
sub vcl_backend_response {
  set beresp.ttl = 60s;
  set beresp.grace = 60s;
  if (beresp.http.content-type ~ "json") { set beresp.do_gzip = true; }
}
VCL
  "$VARNISHD" -F -n "$work/varnish" -a "127.0.0.1:$VARNISH_PORT" -f "$work/stoa.vcl" \
    -s malloc,256m -p thread_pool_min=50 >"$work/varnish.log" 2>&1 &
  pids+=($!)
  wait_for varnish "http://127.0.0.1:$VARNISH_PORT/restaurant/menu.json" $! "$work/varnish.log" 30
fi

targets=(stoa nginx)
declare -A port=([stoa]=$STOA_PORT [nginx]=$NGINX_PORT [varnish]=$VARNISH_PORT)
[ "$HAVE_VARNISH" = 1 ] && targets+=(varnish)

# Warm every cache, and check each answers compressed; note the coding and sizes.
path=/restaurant/menu.json
identity_bytes=$(c "http://127.0.0.1:$STOA_PORT$path" | wc -c)
for t in "${targets[@]}"; do
  for _ in 1 2 3; do c -o /dev/null -H "Accept-Encoding: $ACCEPT_ENCODING" "http://127.0.0.1:${port[$t]}$path"; done
  read -r enc head_bytes body_bytes < <(c -o /dev/null -D "$work/$t.head" -w '%{size_header} %{size_download}\n' \
    -H "Accept-Encoding: $ACCEPT_ENCODING" "http://127.0.0.1:${port[$t]}$path" \
    | { read -r h b; e=$(tr -d '\r' <"$work/$t.head" | awk -F': *' 'tolower($1)=="content-encoding" { print $2 }'); echo "${e:-identity} $h $b"; })
  rec "$t" 0 encoding "$enc"
  rec "$t" 0 head_bytes "$head_bytes"
  rec "$t" 0 body_bytes "$body_bytes"
done

# --- the runs: servers interleaved in each round ------------------------------------------
# wrk's Requests/sec and Transfer/sec give requests/s and the bytes on the wire per answer.
echo "hits of $path ($identity_bytes bytes identity) with Accept-Encoding: $ACCEPT_ENCODING;" \
     "wrk -t$THREADS -c$CONNECTIONS -d$DURATION x $ROUNDS round(s); $(nproc) cores" >&2
for round in $(seq 1 "$ROUNDS"); do
  for t in "${targets[@]}"; do
    out=$(timeout 120 wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" \
      -H "Accept-Encoding: $ACCEPT_ENCODING" "http://127.0.0.1:${port[$t]}$path" 2>&1) \
      || { echo "$out" >&2; die "wrk failed against $t"; }
    read -r rps per_answer bad < <(printf '%s\n' "$out" | awk '
      function bytes(v) { if (v ~ /GB$/) return v * 1073741824; if (v ~ /MB$/) return v * 1048576; if (v ~ /KB$/) return v * 1024; return v + 0 }
      /^Requests\/sec/ { rps = $2 } /^Transfer\/sec/ { tps = bytes($2) } /Non-2xx/ { bad = $NF }
      END { printf "%s %.0f %d\n", rps, (rps > 0 ? tps / rps : 0), bad }')
    rec "$t" "$round" rps "$rps"
    rec "$t" "$round" wire_bytes "$per_answer"
    [ "$bad" = 0 ] || echo "  $t: $bad non-2xx answers in round $round" >&2
  done
done

python3 - "$results" "${targets[@]}" <<'PY'
import collections, statistics, sys
path, targets = sys.argv[1], sys.argv[2:]
data = collections.defaultdict(dict)   # (target, metric) -> {round: value}
for line in open(path):
    t, rnd, metric, value = line.rstrip("\n").split("\t")
    data[(t, metric)][int(rnd)] = value
num = lambda t, m: {r: float(v) for r, v in data[(t, m)].items()}
med = lambda xs: statistics.median(xs) if xs else None
def ratio(m, a, b):
    xa, xb = num(a, m), num(b, m)
    rs = [xa[r] / xb[r] for r in sorted(xa) if r in xb and xb[r] > 0]
    return "N/A" if not rs else f"{med(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})" if len(rs) > 1 else f"{rs[0]:.2f}"
print(f"{'':28}" + "".join(f"{t:>16}" for t in targets) + "".join(f"{'stoa/' + p:>20}" for p in targets[1:]))
rows = [("requests/s (median)", "rps", "{:,.0f}"), ("wire bytes/answer (wrk)", "wire_bytes", "{:,.0f}")]
for label, m, f in rows:
    cells = "".join(f"{(f.format(med(list(num(t, m).values()))) if num(t, m) else 'N/A'):>16}" for t in targets)
    print(f"{label:28}{cells}" + "".join(f"{ratio(m, 'stoa', p):>20}" for p in targets[1:]))
for label, m in [("content-encoding", "encoding"), ("head bytes (curl)", "head_bytes"), ("body bytes (curl)", "body_bytes")]:
    print(f"{label:28}" + "".join(f"{data[(t, m)].get(0, 'N/A'):>16}" for t in targets))
PY
