#!/usr/bin/env bash
# The disk tier (`cache.disk`) on loopback, in front of nginx serving one 30 KB answer at
# every /k/<n> (cache compression off, so that an entry is the answer's bytes):
#   1. disk hits: memory of 16 MiB (about 500 such entries), KEYS1 [8000] entries on disk;
#      wrk with uniformly random keys at 1 and at 8 connections: latency p50 / p99 and the
#      share of requests that were disk hits (most; the rest hit memory);
#   2. a working set 4x memory: memory of 32 MiB and KEYS2 [4300] entries (about 128 MB),
#      served from memory + disk, against the same keys on a stoa whose memory holds them
#      all (256 MiB, no disk tier); ROUNDS [3] interleaved rounds of DURATION [5] s each,
#      medians: requests/s, p99, CPU µs per request; then memory hits of one key on each
#      (the disk tier costs a memory hit nothing);
#   3. a restart with about 1 GiB on disk: KEYS3 [35000] entries of 30 KB written, SIGTERM,
#      start again: time from the start to the first hit, and the share of those entries
#      answered HIT (from disk) in one pass over them.
#
#   loadtest/disk.sh
#   NO_BUILD=1 ROUNDS=5 loadtest/disk.sh
#   PARTS=2 loadtest/disk.sh      # only part 2 (PARTS [123])
#
# The disk files are in $TMPDIR: on a machine with free memory, reads come from the page
# cache, as they would for a hot working set in production.
# Needs nginx, wrk, curl, python3; builds stoa in release mode unless NO_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
LOADTEST=$PWD/loadtest
. "$LOADTEST/lib.sh"

PARTS=${PARTS:-123}
KEYS1=${KEYS1:-8000}
KEYS2=${KEYS2:-4300}
KEYS3=${KEYS3:-35000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
PORT_BASE=${PORT_BASE:-19600}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
for tool in "$NGINX" wrk curl python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done
if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building stoa (release)" >&2
  cargo build --release -q --bin stoa
fi
STOA=$PWD/target/release/stoa

ORIGIN_PORT=$((PORT_BASE + 1))
DISK_PORT=$((PORT_BASE + 2)); DISK_ADMIN=$((PORT_BASE + 3))
MEM_PORT=$((PORT_BASE + 4)); MEM_ADMIN=$((PORT_BASE + 5))
ports_free "$ORIGIN_PORT" "$DISK_PORT" "$DISK_ADMIN" "$MEM_PORT" "$MEM_ADMIN"
start_work disk

# The origin: the same 30 KB of JSON at every /k/<n>.
python3 -c 'import random, string; random.seed(1); print("{\"data\": \"" + "".join(random.choice(string.ascii_letters) for _ in range(30 * 1024 - 14)) + "\"}")' \
  >"$work/body.json"
start_static_origin "$ORIGIN_PORT" 1 "$work/body.json" 'location /k/ { try_files /api/restaurant/dufva =404; }'

# config PORT ADMIN MEMORY [DISK_DIR DISK_BYTES]: a stoa configuration file's path.
config() {
  local port=$1 admin=$2 memory=$3 dir=${4:-} bytes=${5:-} file
  file="$work/stoa-$port.toml"
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\nthreads = 2\nshutdown_timeout = "30s"\n\n' "$port"
    printf '[admin]\nlisten = "127.0.0.1:%s"\n\n[log]\naccess_log = false\n\n' "$admin"
    printf '[cache]\nmax_bytes = "%s"\n' "$memory"
    [ -n "$dir" ] && printf 'disk = { path = "%s", max_bytes = "%s" }\n' "$dir" "$bytes"
    printf '[cache.compression]\nenabled = false\n\n'
    printf '[upstreams.origin]\nurl = "http://127.0.0.1:%s"\nmax_in_flight = 64\n\n' "$ORIGIN_PORT"
    printf '[[routes]]\nname = "k"\npath = "/k/{n}"\nmethods = ["GET"]\nupstream = "origin"\ncache = { ttl = "1h" }\n'
  } >"$file"
  echo "$file"
}

# start PORT ADMIN CONFIG: starts stoa, sets $stoa_pid, returns once it is ready.
start() {
  local port=$1 admin=$2 file=$3
  "$STOA" --config "$file" >>"$work/stoa-$port.log" 2>&1 &
  pids+=($!); stoa_pid=$!
  wait_for stoa "http://127.0.0.1:$admin/readyz" "$stoa_pid" "$work/stoa-$port.log" 60
}

# stop PID: SIGTERM, waits for the exit.
stop() {
  kill -TERM "$1"
  while kill -0 "$1" 2>/dev/null; do sleep 0.05; done
}

metric() { curl -fsS "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s { print $2 }'; }

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

if [[ $PARTS == *1* ]]; then
echo "== 1. disk hits of 30 KB entries ($KEYS1 on disk, 16 MiB of memory)"
file=$(config "$DISK_PORT" "$DISK_ADMIN" 16MiB "$work/disk1" 1GiB)
start "$DISK_PORT" "$DISK_ADMIN" "$file"
echo "fill: $(python3 "$LOADTEST/disk_keys.py" "$DISK_PORT" "$KEYS1" 2)"
sleep 2   # the writer hands the last entries to the files
for c in 1 8; do
  before=$(metric "$DISK_ADMIN" 'stoa_cache_disk_lookups_total{result="hit"}')
  out=$(KEYS=$KEYS1 wrk -t1 -c$c -d"${DURATION}s" --latency -s "$LOADTEST/disk_random.lua" \
    "http://127.0.0.1:$DISK_PORT")
  after=$(metric "$DISK_ADMIN" 'stoa_cache_disk_lookups_total{result="hit"}')
  printf '%s\n' "$out" | awk -v c=$c -v d=$((${after%.*} - ${before%.*})) '
    /^ +50%/ { p50 = $2 } /^ +99%/ { p99 = $2 } /^Requests\/sec/ { rps = $2 } / requests in / { n = $1 }
    END { printf "  %d connection(s): %s requests/s, p50 %s, p99 %s, disk hits %.0f%% of %d requests\n", c, rps, p50, p99, 100 * d / n, n }'
done
stop "$stoa_pid"
fi

if [[ $PARTS == *2* ]]; then
echo "== 2. a working set 4x memory ($KEYS2 entries): memory + disk vs all in memory"
disk_file=$(config "$DISK_PORT" "$DISK_ADMIN" 32MiB "$work/disk2" 1GiB)
mem_file=$(config "$MEM_PORT" "$MEM_ADMIN" 256MiB)
start "$DISK_PORT" "$DISK_ADMIN" "$disk_file"; disk_pid=$stoa_pid
start "$MEM_PORT" "$MEM_ADMIN" "$mem_file"; mem_pid=$stoa_pid
echo "fill (disk): $(python3 "$LOADTEST/disk_keys.py" "$DISK_PORT" "$KEYS2" 2)"
echo "fill (memory): $(python3 "$LOADTEST/disk_keys.py" "$MEM_PORT" "$KEYS2" 2)"
sleep 2
CONNECTIONS=${CONNECTIONS:-16}
export KEYS=$KEYS2
wrk_round_keys() {  # wrk_round with the random-key script
  local pid=$1 url=$2 t0 t1 out
  t0=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  out=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$LOADTEST/disk_random.lua" "$url")
  t1=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  printf '%s\n' "$out" | awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 } / requests in / { n = $1 }
    END { printf "%s %.2f %.1f\n", rps, p99, (n > 0 ? t * 1000000 / hz / n : 0) }'
}
: >"$work/rounds-disk"; : >"$work/rounds-mem"
for r in $(seq 1 "$ROUNDS"); do
  wrk_round_keys "$disk_pid" "http://127.0.0.1:$DISK_PORT" >>"$work/rounds-disk"
  wrk_round_keys "$mem_pid" "http://127.0.0.1:$MEM_PORT" >>"$work/rounds-mem"
done
for which in disk mem; do
  f="$work/rounds-$which"
  printf '  %-6s requests/s %s, p99 %s ms, CPU %s us/request (medians of %d rounds)\n' "$which" \
    "$(cut -d' ' -f1 "$f" | median)" "$(cut -d' ' -f2 "$f" | median)" "$(cut -d' ' -f3 "$f" | median)" "$ROUNDS"
done
echo "  disk node: $(metric "$DISK_ADMIN" 'stoa_cache_disk_lookups_total{result="hit"}') disk hits"
# Memory hits of one hot key, with and without the disk tier configured.
: >"$work/hot-disk"; : >"$work/hot-mem"
for r in $(seq 1 "$ROUNDS"); do
  wrk_round "$disk_pid" "http://127.0.0.1:$DISK_PORT/k/1" | cut -d' ' -f1,2,5 >>"$work/hot-disk"
  wrk_round "$mem_pid" "http://127.0.0.1:$MEM_PORT/k/1" | cut -d' ' -f1,2,5 >>"$work/hot-mem"
done
for which in disk mem; do
  f="$work/hot-$which"
  printf '  memory hits of one key, %-4s node: requests/s %s, p99 %s ms, CPU %s us/request\n' "$which" \
    "$(cut -d' ' -f1 "$f" | median)" "$(cut -d' ' -f2 "$f" | median)" "$(cut -d' ' -f3 "$f" | median)"
done
stop "$disk_pid"; stop "$mem_pid"
fi

if [[ $PARTS == *3* ]]; then
echo "== 3. restart with about 1 GiB on disk ($KEYS3 entries of 30 KB)"
file=$(config "$DISK_PORT" "$DISK_ADMIN" 64MiB "$work/disk3" 2GiB)
start "$DISK_PORT" "$DISK_ADMIN" "$file"
echo "fill: $(python3 "$LOADTEST/disk_keys.py" "$DISK_PORT" "$KEYS3" 2)"
echo "  written: $(metric "$DISK_ADMIN" 'stoa_cache_disk_written_bytes_total') bytes, dropped: $(metric "$DISK_ADMIN" 'stoa_cache_disk_writes_total{result="dropped"}')"
t0=$(date +%s.%N)
stop "$stoa_pid"
t1=$(date +%s.%N)
echo "  stop (SIGTERM, queued writes flushed): $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s; on disk: $(du -sh "$work/disk3" | cut -f1)"
t0=$(date +%s.%N)
"$STOA" --config "$file" >>"$work/stoa-$DISK_PORT.log" 2>&1 &
pids+=($!); stoa_pid=$!
last=$((KEYS3 - 1))
until [ "$(curl -s -o /dev/null -w '%header{x-cache}' "http://127.0.0.1:$DISK_PORT/k/$last" 2>/dev/null)" = HIT ]; do
  kill -0 "$stoa_pid" || die "stoa exited"
  sleep 0.01
done
t1=$(date +%s.%N)
echo "  first hit $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s after the start; recovery $(metric "$DISK_ADMIN" stoa_cache_disk_recovery_seconds) s"
echo "  pass over every entry: $(python3 "$LOADTEST/disk_keys.py" "$DISK_PORT" "$KEYS3" 2)"
stop "$stoa_pid"
fi
