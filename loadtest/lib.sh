# Shared by the loadtest scripts: a work directory torn down with every process started,
# port checks and readiness waits. Source it after `cd` to the repository root.

# die MESSAGE: the script's name, the message, exit 1.
die() { echo "${0##*/}: $*" >&2; exit 1; }

# start_work NAME: $work (a temporary directory) and $pids (processes to stop); on exit,
# each is sent SIGTERM, given up to 5 s, then SIGKILL, and $work is removed.
start_work() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/stoa-$1.XXXXXX")
  chmod 755 "$work"
  pids=()
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do   # up to 5 s for a clean exit, then SIGKILL
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
  exit "$rc"
}

# ports_free PORT...: dies if any is taken on 127.0.0.1.
ports_free() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      die "127.0.0.1:$port is already in use (set PORT_BASE to move every port)"
    fi
  done
}

# wait_for NAME URL PID LOG [SECONDS]: until URL answers 2xx (certificates not checked:
# the TLS benchmarks use self-signed ones); on failure, the last lines of LOG.
wait_for() {
  local name=$1 url=$2 pid=$3 log=$4 limit=${5:-15}
  for _ in $(seq 1 $((limit * 10))); do
    curl -kfsS -m 1 -o /dev/null "$url" 2>/dev/null && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "${0##*/}: $name exited before answering $url; its log:" >&2
      tail -n 30 "$log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  echo "${0##*/}: $name did not answer $url within ${limit}s; its log:" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
}

# start_static_origin PORT [WORKERS [BODY_FILE [LOCATIONS]]]: nginx ($NGINX, WORKERS worker
# processes, default 1) on 127.0.0.1:PORT serving BODY_FILE (default: 381 bytes of JSON, the
# size of the demo's menu) at /api/restaurant/dufva, and the nginx LOCATIONS given (more paths
# for the same file, say), files under $work/origin; sets $origin_pid and returns once it
# answers.
start_static_origin() {
  local ORIGIN_PORT=$1 workers=${2:-1} body=${3:-} locations=${4:-}
  mkdir -p "$work/origin/www/api/restaurant" "$work/origin/tmp"
  if [ -n "$body" ]; then
    cp "$body" "$work/origin/www/api/restaurant/dufva"
  else
    python3 -c 'import sys; h, t = "{\"name\": \"Dufva\", \"menu\": \"", "\"}"; sys.stdout.write(h + "x" * (381 - len(h) - len(t)) + t)' \
      >"$work/origin/www/api/restaurant/dufva"
  fi
  chmod -R a+rX "$work/origin"
  cat >"$work/origin.conf" <<NGINX
worker_processes $workers;
pid $work/origin.pid;
error_log $work/origin/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/origin/tmp;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$ORIGIN_PORT backlog=4096;
    root $work/origin/www;
    default_type application/json;
    $locations
  }
}
NGINX
  "$NGINX" -p "$work/origin" -c "$work/origin.conf" >"$work/origin.out" 2>&1 &
  pids+=($!); origin_pid=$!
  wait_for "nginx (origin)" "http://127.0.0.1:$ORIGIN_PORT/api/restaurant/dufva" $! "$work/origin.out"
}

# wrk_round PID URL: one `wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency` run against URL,
# with the CPU (user + system, all threads, /proc/PID/stat) PID spent over it. Prints
# "requests/s p99-ms requests non-2xx cpu-us-per-request".
wrk_round() {
  local pid=$1 url=$2 t0 t1 out rps p99 n bad
  t0=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  out=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url")
  t1=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  read -r rps p99 n bad < <(printf '%s\n' "$out" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 } / requests in / { n = $1 }
    /Non-2xx/ { bad = $NF } END { printf "%s %.2f %d %d\n", rps, p99, n, bad }')
  awk -v rps="$rps" -v p99="$p99" -v n="$n" -v bad="$bad" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%s %s %d %d %.1f\n", rps, p99, n, bad, (n > 0 ? t * 1000000 / hz / n : 0) }'
}
