#!/usr/bin/env bash
# Two stoa variants side by side, same configuration otherwise, in front of one nginx serving
# a static file, driven by wrk in interleaved rounds: cache hits and pass-through. Prints
# requests/s, p99 and CPU µs per request (user + system of stoa's threads over the run,
# /proc/PID/stat) of every run, then the medians and the ratios.
#
#   loadtest/workers.sh            # the thread models: server.worker_model = "workers" (threads
#                                  # single-thread workers, no work stealing, one shared socket)
#                                  # against "shared" (one service, tokio's work stealing)
#   loadtest/workers.sh --front    # the HTTP/1 front: server.front = true against false (every
#                                  # request through pingora's proxy)
#   loadtest/workers.sh --forward  # pass-through forwarded by the front: server.front_forward
#                                  # = true against false (pass-through by pingora's proxy)
#   loadtest/workers.sh --log      # the JSON access log to a file against no access log
#   loadtest/workers.sh --builds BEFORE [AFTER]
#                                  # two builds of stoa, same configuration: a binary kept from
#                                  # before a change against AFTER (default target/release/stoa)
#   DURATION=5 ROUNDS=3 CONNECTIONS=50 WORKERS=2 loadtest/workers.sh
#
# Needs nginx, wrk and python3; uses target/release/stoa (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
WORKERS=${WORKERS:-2}
PORT_BASE=${PORT_BASE:-19400}
ORIGIN_PORT=$((PORT_BASE + 1))

. loadtest/lib.sh
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx is required"
command -v wrk >/dev/null 2>&1 || die "wrk is required"
[ -x target/release/stoa ] || die "build it first: cargo build --release"

start_work workers
# The two variants: their names, the [server] line and the [log] section each gets.
a=workers b=shared
declare -A setting_of=([workers]='worker_model = "workers"' [shared]='worker_model = "shared"')
quiet=$'level = "warn"\naccess_log = false'
declare -A log_of=([workers]=$quiet [shared]=$quiet)
declare -A bin_of=([workers]=./target/release/stoa [shared]=./target/release/stoa)
case ${1:-} in
  --builds) [ -n "${2:-}" ] || die "usage: loadtest/workers.sh --builds BEFORE [AFTER]"
            a=before b=after; setting_of=([before]='' [after]='')
            log_of=([before]=$quiet [after]=$quiet)
            bin_of=([before]=$2 [after]=${3:-./target/release/stoa})
            for bin in "${bin_of[@]}"; do [ -x "$bin" ] || die "not an executable: $bin"; done ;;
  --front) a=front b=proxy; setting_of=([front]='front = true' [proxy]='front = false')
           log_of=([front]=$quiet [proxy]=$quiet)
           bin_of=([front]=./target/release/stoa [proxy]=./target/release/stoa) ;;
  --forward) a=forward b=proxy; setting_of=([forward]='front_forward = true' [proxy]='front_forward = false')
             log_of=([forward]=$quiet [proxy]=$quiet)
             bin_of=([forward]=./target/release/stoa [proxy]=./target/release/stoa) ;;
  --log) a=logged b=quiet; setting_of=([logged]='' [quiet]='')
         log_of=([logged]="$(printf 'level = "info"\naccess_log = true\nformat = "json"\naccess_log_file = "%s"' "$work/access.log")"
                 [quiet]=$quiet)
         bin_of=([logged]=./target/release/stoa [quiet]=./target/release/stoa) ;;
  '') ;;
  *) die "usage: loadtest/workers.sh [--front | --forward | --log | --builds BEFORE [AFTER]]" ;;
esac

declare -A port_of=([$a]=$((PORT_BASE + 2)) [$b]=$((PORT_BASE + 4)))
declare -A admin_of=([$a]=$((PORT_BASE + 3)) [$b]=$((PORT_BASE + 5)))
ports_free $ORIGIN_PORT "${port_of[@]}" "${admin_of[@]}"

start_static_origin "$ORIGIN_PORT"

declare -A pid_of
for model in $a $b; do
  cat >"$work/$model.toml" <<TOML
[server]
listen = "127.0.0.1:${port_of[$model]}"
threads = $WORKERS
${setting_of[$model]}
[admin]
listen = "127.0.0.1:${admin_of[$model]}"
[log]
${log_of[$model]}
[upstreams.origin]
url = "http://127.0.0.1:$ORIGIN_PORT"
[[routes]]
name = "hit"
methods = ["GET"]
path = "/hit/{id}"
upstream = "origin"
rewrite = "/api/restaurant/{id}"
cache = { ttl = "1h" }
[[routes]]
name = "pass"
methods = ["GET"]
path = "/api/{*rest}"
upstream = "origin"
TOML
  "${bin_of[$model]}" --config "$work/$model.toml" >"$work/$model.log" 2>&1 &
  pids+=($!); pid_of[$model]=$!
  wait_for "stoa ($model)" "http://127.0.0.1:${admin_of[$model]}/readyz" $! "$work/$model.log"
  curl -fsS -o /dev/null "http://127.0.0.1:${port_of[$model]}/hit/dufva"
done

echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROUNDS interleaved rounds; stoa threads = $WORKERS; $(nproc) cores"
if [ "$a" = before ]; then
  echo "before: ${bin_of[before]}; after: ${bin_of[after]}"
else
  echo "$a: ${setting_of[$a]}; $b: ${setting_of[$b]}"
fi
printf '%-5s %-8s %5s %12s %9s %14s\n' row variant round requests/s "p99 ms" "CPU us/req"
results=$work/results
for r in $(seq 1 "$ROUNDS"); do
  for row in hit pass; do
    path=/hit/dufva; [ "$row" = pass ] && path=/api/restaurant/dufva
    # Alternate who goes first from round to round.
    order="$a $b"; [ $((r % 2)) = 0 ] && order="$b $a"
    for model in $order; do
      read -r rps p99 _ bad cpu < <(wrk_round "${pid_of[$model]}" "http://127.0.0.1:${port_of[$model]}$path")
      [ "$bad" = 0 ] || echo "  ($row, $model, round $r: $bad non-2xx answers)"
      printf '%-5s %-8s %5s %12s %9s %14s\n' "$row" "$model" "$r" "$rps" "$p99" "$cpu"
      echo "$row $model $rps $p99 $cpu" >>"$results"
    done
  done
done
echo "medians:"
python3 - "$results" "$a" "$b" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    row, model, *vals = line.split()
    rows.setdefault((row, model), []).append([float(v) for v in vals])
med = {k: [statistics.median(col) for col in zip(*v)] for k, v in rows.items()}
for (row, model), (rps, p99, cpu) in sorted(med.items()):
    print(f"{row:<5} {model:<8} {rps:>12,.0f} requests/s  p99 {p99:6.2f} ms  {cpu:6.1f} CPU us/req")
a, b = sys.argv[2], sys.argv[3]
for row in ("hit", "pass"):
    w, s = med.get((row, a)), med.get((row, b))
    if w and s:
        print(f"{row}: {a}/{b} requests/s {w[0] / s[0]:.2f}x, CPU per request {w[2] / s[2]:.2f}x")
PY
if [ -f "$work/access.log" ]; then
  echo "access log of the logged variant: $(wc -l <"$work/access.log") lines written (every request, hits and pass-through, is a line)"
fi
