#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 15). New
# inputs go to target/fuzz-corpus/; the committed seeds in fuzz/corpus/ are read only.
# A crash fails the run and leaves its input in fuzz/artifacts/<target>/: add it as a
# regression test in herald-protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: the nightly toolchain is needed (rustup toolchain install nightly)"
  exit 1
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
secs=${FUZZ_SECONDS:-15}
for t in client_text binary_frame envelope channel token; do
  mkdir -p "target/fuzz-corpus/$t"
  log="target/fuzz-$t.log"
  if ! cargo +nightly fuzz run "$t" "target/fuzz-corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 > "$log" 2>&1; then
    grep -E "panicked|SUMMARY|ERROR|Error" -A3 "$log" | head -n 30
    echo "fuzz: $t found a crash (input in fuzz/artifacts/$t/; full log $log)"
    exit 1
  fi
  echo "fuzz: $t ok: $(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1)"
done
