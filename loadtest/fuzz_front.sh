#!/usr/bin/env bash
# The front's differential test (src/front/fuzz.rs) run longer: SEEDS seeds [1 2 3 4 5],
# CASES generated streams each [3000]. Each stream of pipelined requests is read by the
# front's head reader and lane choice (whole, split at every byte, in random pieces), by
# pingora's HTTP/1 session alone, and by httparse with RFC 9112's framing rules. Prints each
# run's line (streams, executions, requests by lane, expected differences, divergences) and
# fails on the first divergence, printing the stream that shows it.
#
#   loadtest/fuzz_front.sh
#   SEEDS="7 8" CASES=20000 loadtest/fuzz_front.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3 4 5"}
CASES=${CASES:-3000}
TEST=front::fuzz::the_front_reads_generated_streams_as_pingora_and_rfc_9112_do
cargo test -q --lib --no-run
executions=0
for seed in $SEEDS; do
  out=$(mktemp)
  status=0
  STOA_FUZZ_SEED=$seed STOA_FUZZ_CASES=$CASES \
    cargo test -q --lib "$TEST" -- --exact --nocapture >"$out" 2>&1 || status=$?
  line=$(grep -o "^front fuzz:.* divergences" "$out" || true)
  echo "$line"
  if [ "$status" != 0 ]; then
    sed -n '/divergences:$/,/^stack backtrace/p' "$out" | head -40
    rm -f "$out"
    echo "fuzz_front.sh: seed $seed diverged" >&2
    exit 1
  fi
  rm -f "$out"
  n=$(echo "$line" | sed -E 's/.* ([0-9]+) executions.*/\1/')
  executions=$((executions + n))
done
echo "fuzz_front.sh: seeds $SEEDS, $executions executions, no divergence" >&2
