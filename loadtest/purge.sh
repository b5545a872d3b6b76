#!/usr/bin/env bash
# Invalidation at scale, on loopback:
#   1. a tag purge of KEYS [100000] entries on one stoa: time until the purge answered
#      (acknowledged), ROUNDS [3] rounds, each after filling the entries again;
#   2. the same on three stoa sharing one Redis: every node holds the KEYS entries (one
#      fetched them, the others read Redis), the purge goes through node 0 and is answered
#      once every node confirmed; then every node's count of the route's entries is read;
#   3. a soft purge of a hot key under load (wrk on one key, the purge in the middle):
#      upstream calls during the run (target: exactly 1, the one revalidation).
#
#   loadtest/purge.sh
#   KEYS=20000 ROUNDS=5 loadtest/purge.sh
#
# Needs redis-server, curl, python3 (scripts/install-deps.sh) and wrk (installed if missing); builds stoa and stoa-demo
# in release mode unless NO_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
LOADTEST=$PWD/loadtest
. "$LOADTEST/lib.sh"

KEYS=${KEYS:-100000}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
PORT_BASE=${PORT_BASE:-19500}
TOKEN=purge-bench

if ! command -v wrk >/dev/null 2>&1; then
  echo "installing wrk" >&2
  SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends wrk \
    >/dev/null || true
fi
for tool in redis-server wrk curl python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done
if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building stoa and stoa-demo (release)" >&2
  cargo build --release -q --workspace --bins
fi

REDIS_PORT=$((PORT_BASE + 1))
UP_PORT=$((PORT_BASE + 2))
SOLO_PORT=$((PORT_BASE + 4)); SOLO_ADMIN=$((PORT_BASE + 5))
node_port() { echo $((PORT_BASE + 10 + 2 * $1)); }
node_admin() { echo $((PORT_BASE + 11 + 2 * $1)); }
ports_free "$REDIS_PORT" "$UP_PORT" "$SOLO_PORT" "$SOLO_ADMIN" \
  "$(node_port 0)" "$(node_admin 0)" "$(node_port 1)" "$(node_admin 1)" "$(node_port 2)" "$(node_admin 2)"

start_work purge
c() { curl -fsS -m 120 "$@"; }

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  >"$work/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done

./target/release/stoa-demo --only restaurants --restaurants "127.0.0.1:$UP_PORT" \
  >"$work/demo.log" 2>&1 &
pids+=($!)
wait_for stoa-demo "http://127.0.0.1:$UP_PORT/__stats" "${pids[-1]}" "$work/demo.log"
upstream_calls() {
  c "http://127.0.0.1:$UP_PORT/__stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['total'])"
}

# start_stoa NAME PORT ADMIN CLUSTER_TOML: starts it, appends its pid to $pids.
start_stoa() {
  cat >"$work/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$2"
threads = 2

[admin]
listen = "127.0.0.1:$3"
token = "$TOKEN"

[cache]
max_bytes = "1GiB"

$4

[upstreams.restaurants]
url = "http://127.0.0.1:$UP_PORT"

[[routes]]
name = "bulk"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "restaurants"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "1h", tags = ["bulk", "restaurant:{id}"] }
EOF
  ./target/release/stoa --config "$work/$1.toml" >"$work/$1.log" 2>&1 &
  pids+=($!)
  wait_for "$1" "http://127.0.0.1:$3/readyz" "${pids[-1]}" "$work/$1.log"
}

entries() {   # ADMIN: entries of the route
  c -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$1/admin/cache" \
    | python3 -c "import json,sys; r=json.load(sys.stdin)['routes']; print(r.get('bulk', {}).get('entries', 0))"
}

cat >"$work/fill.lua" <<EOF
local i = 0
request = function()
  i = i % $KEYS + 1
  return wrk.format(nil, "/restaurant/dufva?k=" .. i)
end
EOF

fill() {   # PORT ADMIN: until the node holds KEYS entries
  local tries=0
  while [ "$(entries "$2")" -lt "$KEYS" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 30 ] || die "could not fill $KEYS entries on port $1"
    wrk -t1 -c"$CONNECTIONS" -d5s -s "$work/fill.lua" "http://127.0.0.1:$1" >/dev/null
  done
}

purge_tag() {   # ADMIN BODY: prints "seconds answer"
  curl -fsS -m 120 -o "$work/answer.json" -w "%{time_total}" -H "Authorization: Bearer $TOKEN" \
    -X POST -d "$2" "http://127.0.0.1:$1/admin/purge"
  echo " $(tr -d '\n' <"$work/answer.json")"
}

echo "== one node: tag purge of $KEYS entries, $ROUNDS rounds" >&2
start_stoa solo "$SOLO_PORT" "$SOLO_ADMIN" ""
solo_times=()
for r in $(seq 1 "$ROUNDS"); do
  fill "$SOLO_PORT" "$SOLO_ADMIN"
  read -r secs answer < <(purge_tag "$SOLO_ADMIN" '{"tags":["bulk"]}')
  left=$(entries "$SOLO_ADMIN")
  echo "round $r: ${secs}s $answer, entries left $left" >&2
  solo_times+=("$secs")
done

echo "== three nodes on one Redis: tag purge of $KEYS entries each, $ROUNDS rounds" >&2
for n in 0 1 2; do
  start_stoa "node-$n" "$(node_port $n)" "$(node_admin $n)" \
    "[cluster]
redis = \"redis://127.0.0.1:$REDIS_PORT/0\"
node_name = \"node-$n\"
ack_timeout = \"10s\""
done
sleep 2   # every node announces itself live
cluster_times=()
for r in $(seq 1 "$ROUNDS"); do
  for n in 0 1 2; do fill "$(node_port $n)" "$(node_admin $n)"; done
  read -r secs answer < <(purge_tag "$(node_admin 0)" '{"tags":["bulk"]}')
  left="$(entries "$(node_admin 0)")/$(entries "$(node_admin 1)")/$(entries "$(node_admin 2)")"
  echo "round $r: ${secs}s $answer, entries left per node $left" >&2
  cluster_times+=("$secs")
done

echo "== soft purge of a hot key under load (one node)" >&2
c -o /dev/null "http://127.0.0.1:$SOLO_PORT/restaurant/dufva?hot=1"
before=$(upstream_calls)
wrk -t1 -c"$CONNECTIONS" -d6s "http://127.0.0.1:$SOLO_PORT/restaurant/dufva?hot=1" >"$work/hot.txt" &
wrk_pid=$!
sleep 3
purge_tag "$SOLO_ADMIN" '{"tags":["restaurant:dufva"],"soft":true}' >&2
wait "$wrk_pid"
after=$(upstream_calls)
hot_rps=$(awk '/Requests\/sec/ { print $2 }' "$work/hot.txt")
hot_calls=$((after - before))

python3 - "$KEYS" "$hot_calls" "$hot_rps" "${solo_times[*]}" "${cluster_times[*]}" <<'EOF'
import statistics, sys
keys, calls, rps, solo, cluster = sys.argv[1:6]
solo = [float(x) for x in solo.split()]
cluster = [float(x) for x in cluster.split()]
def ms(xs):
    return f"{statistics.median(xs) * 1000:.0f} ms (max {max(xs) * 1000:.0f} ms, {len(xs)} rounds)"
print(f"| row | result |")
print(f"| --- | --- |")
print(f"| tag purge of {int(keys):,} entries, one node, to acknowledged | {ms(solo)} |")
print(f"| tag purge of {int(keys):,} entries on each of three nodes + Redis, to every node's confirmation | {ms(cluster)} |")
print(f"| soft purge of a hot key under load ({rps} req/s): upstream calls | {calls} (target 1) |")
EOF
