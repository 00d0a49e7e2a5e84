#!/usr/bin/env bash
# Runs each cargo-fuzz target in fuzz/ for SECONDS (default 30), one after
# the other, each on one core, and prints each target's final stats.
#
#   scripts/fuzz.sh [SECONDS]
#
# Installs cargo-fuzz if it is missing. cargo fuzz passes nightly flags
# (-Zsanitizer=address, sanitizer coverage); RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them, so no nightly toolchain is needed. Targets
# are built with debug assertions (-a). The corpus grows in fuzz/corpus/,
# a failing input is saved in fuzz/artifacts/, full logs go to
# fuzz/target/logs/. Exits non-zero if any target failed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-30}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing it"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

cargo fuzz build -a
mkdir -p target/logs
failed=()
for target in $(cargo fuzz list); do
    log="target/logs/$target.log"
    echo "=== fuzzing $target for ${secs}s (log: fuzz/$log) ==="
    status=0
    cargo fuzz run -a "$target" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    # The last status line ("#N DONE cov: ... ft: ... corp: ... exec/s ...")
    # and the executions count.
    grep -E '^#[0-9]+' "$log" | tail -n 1 || true
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
    if [[ $status -ne 0 ]]; then
        echo "FAIL: $target (exit $status); the end of its log:"
        tail -n 40 "$log"
        failed+=("$target")
    else
        echo "ok: $target"
    fi
done
if [[ ${#failed[@]} -ne 0 ]]; then
    echo "fuzzing FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzzing: all targets ran ${secs}s without a failure"
