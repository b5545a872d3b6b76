#!/usr/bin/env bash
# The randomized invalidation test (tests/invalidation_model.rs) run longer: SEEDS seeds
# [5], OPS operations each [3000], on one node, three nodes on one Redis and three nodes on
# a Redis Cluster. Prints each run's line (reads checked, stale reads) and fails on the
# first stale read.
#
#   loadtest/invalidation_model.sh
#   SEEDS="1 2 3" OPS=10000 loadtest/invalidation_model.sh
#
# Needs redis-server (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3 4 5"}
OPS=${OPS:-3000}
cargo build -q --tests
runs=0
for seed in $SEEDS; do
  echo "seed $seed, $OPS operations per test" >&2
  out=$(mktemp)
  status=0
  STOA_MODEL_SEED=$seed STOA_MODEL_OPS=$OPS \
    cargo test -q --test invalidation_model -- --nocapture --test-threads 1 >"$out" 2>&1 \
    || status=$?
  grep -E "reads checked|older than|version .* after" "$out" || true
  rm -f "$out"
  [ "$status" = 0 ] || { echo "invalidation_model.sh: seed $seed failed" >&2; exit 1; }
  runs=$((runs + 1))
done
echo "invalidation_model.sh: $runs seeds, no stale read" >&2
