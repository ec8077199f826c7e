#!/usr/bin/env bash
# Runs the fuzz targets with libFuzzer through cargo-fuzz, each for a number of seconds.
#
#   fuzz/run.sh [seconds-per-target] [target...]     (default: 60 seconds, every target)
#
# Works on the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc accept the nightly-only
# sanitizer flags cargo-fuzz passes. New inputs go to fuzz/work/<target>/ (not checked in);
# the checked-in seeds in fuzz/corpus/<target>/ are read only. Crashes land in
# fuzz/artifacts/<target>/: minimise one with `cargo fuzz tmin`, fix it, and check the
# minimised input into fuzz/corpus/<target>/ so the corpus replay test guards the fix.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(request_body config ext_proc_exchange c_abi prometheus_text kv_events)
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

# -O with debug assertions: fast, but overflow and debug_assert! still count as findings.
cargo fuzz build -O --debug-assertions

status=0
for target in "${targets[@]}"; do
  mkdir -p "work/$target" "artifacts/$target"
  log="work/$target.log"
  echo "== $target: ${seconds}s"
  if ! cargo fuzz run -O --debug-assertions "$target" "work/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    echo "!! $target found a failure; see $log and artifacts/$target/"
    status=1
  fi
  grep -E "stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb" "$log" || true
done
exit "$status"
