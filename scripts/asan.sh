#!/usr/bin/env bash
# Runs wharf's test suite (unit and integration tests; every integration test
# runs on both Linux backends, io_uring and poll, through `each_backend`)
# under AddressSanitizer, with LeakSanitizer at exit.
#
#   scripts/asan.sh [cargo test target selection, e.g. --test churn; default --tests]
#
# Works with the stable toolchain: RUSTC_BOOTSTRAP=1 lets it accept
# -Zsanitizer=address, and Rust ships the ASAN runtime for
# x86_64-unknown-linux-gnu in rust-std (no clang or -Zbuild-std needed; the
# standard library itself is not instrumented). The explicit --target keeps
# build scripts and proc-macros uninstrumented; the build goes to
# target/asan so normal builds are not invalidated.
#
# Kernel writes (io_uring completions, recv into buffers) are invisible to
# ASAN: a buffer freed while the kernel still owns it is not caught here.
#
# Prints "ASAN: RAN" or "ASAN: DID NOT RUN", then the verdict: CLEAN (no
# sanitizer report) or NOT CLEAN (the reports). Tests that fail without a
# sanitizer report are listed apart. The environment has
# WHARF_SANITIZER=address, for tests whose bounds (RSS) mean nothing under
# ASAN. Exit status: 0 if clean and every test passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
dir="${CARGO_TARGET_DIR:-target}/asan"
mkdir -p "$dir"
log="$dir/asan.log"

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    echo "ASAN: DID NOT RUN: this script supports Linux on x86_64 only"
    exit 1
fi

export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Zsanitizer=address"
export RUSTDOCFLAGS="-Zsanitizer=address"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export WHARF_SANITIZER=address
export RUST_BACKTRACE=1

# Self-check: the toolchain's ASAN and LSan catch a planted overflow and leak
# on this machine (a sandbox without ptrace can break LSan, for one).
probe="$dir/probe"
mkdir -p "$probe"
cat >"$probe/overflow.rs" <<'EOF'
fn main() {
    let v = vec![1u8; 8];
    let i = std::env::args().count() + 7; // one past the end
    println!("{}", unsafe { *v.as_ptr().add(i) });
}
EOF
cat >"$probe/leak.rs" <<'EOF'
fn main() {
    std::mem::forget(Box::new([7u8; 100]));
}
EOF
for p in overflow leak; do
    if ! rustc -Zsanitizer=address --target "$target" -g "$probe/$p.rs" -o "$probe/$p" \
        >"$probe/$p.build" 2>&1; then
        cat "$probe/$p.build"
        echo "ASAN: DID NOT RUN: rustc cannot build with -Zsanitizer=address here"
        exit 1
    fi
    "$probe/$p" >"$probe/$p.out" 2>&1
done
if ! grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" "$probe/overflow.out"; then
    cat "$probe/overflow.out"
    echo "ASAN: DID NOT RUN: the self-check's heap overflow went unreported"
    exit 1
fi
if ! grep -q "ERROR: LeakSanitizer: detected memory leaks" "$probe/leak.out"; then
    cat "$probe/leak.out"
    echo "ASAN: DID NOT RUN: the self-check's leak went unreported (LeakSanitizer broken here?)"
    exit 1
fi
echo "self-check: ASAN caught a planted heap overflow and LSan a planted leak"

# What to test: the arguments, or every test target.
sel=("$@")
[[ ${#sel[@]} -eq 0 ]] && sel=(--tests)

cargo_test() {
    cargo test -p wharf --target "$target" --target-dir "$dir" "$@"
}

echo "=== building the tests with -Zsanitizer=address (into $dir) ==="
if ! cargo_test "${sel[@]}" --no-run; then
    echo "ASAN: DID NOT RUN: the instrumented build failed"
    exit 1
fi

echo "=== running the tests under ASAN (log: $log) ==="
cargo_test "${sel[@]}" --no-fail-fast >"$log" 2>&1
grep -E '^(     Running|test result:|test .* FAILED$)' "$log"

# A target that failed stopped at its first failing backend; run it again
# once per backend, so that each backend's half still runs under ASAN.
mapfile -t failed_targets < <(sed -n 's/.*to rerun pass `-p wharf \(--test [a-z_0-9]*\|--lib\)`.*/\1/p' "$log")
reruns=()
for t in "${failed_targets[@]}"; do
    for backend in uring poll; do
        rlog="$dir/asan-rerun-${t//[- ]/}-$backend.log"
        echo "=== again: $t with WHARF_BACKEND=$backend (log: $rlog) ==="
        # shellcheck disable=SC2086 # $t is "--test NAME" or "--lib"
        WHARF_BACKEND=$backend cargo_test $t >"$rlog" 2>&1
        grep -E '^(test result:|test .* FAILED$)' "$rlog"
        reruns+=("$rlog")
    done
done

passed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\1/p' "$log" |
    awk '{ s += $1 } END { print s + 0 }')
failed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\2/p' "$log" |
    awk '{ s += $1 } END { print s + 0 }')
binaries=$(grep -c '^test result:' "$log")
reports=$(cat "$log" "${reruns[@]}" | grep -cE '^==[0-9]+==ERROR: (AddressSanitizer|LeakSanitizer)')

echo
echo "ASAN: RAN: $binaries test binaries, $passed passed, $failed failed (both backends where each_backend is used)"
if [[ $reports -ne 0 ]]; then
    echo "ASAN verdict: NOT CLEAN: $reports sanitizer report(s):"
    for f in "$log" "${reruns[@]}"; do
        grep -nE -A30 '^==[0-9]+==ERROR: (AddressSanitizer|LeakSanitizer)' "$f" |
            sed "s|^|$(basename "$f"):|"
        grep -E '^SUMMARY: AddressSanitizer' "$f" | sed "s|^|$(basename "$f"):|"
    done
    exit 1
fi
echo "ASAN verdict: CLEAN (no AddressSanitizer or LeakSanitizer report)"
if [[ $failed -ne 0 ]]; then
    echo "but $failed test(s) failed without a sanitizer report:"
    sed -n '/^---- .* stdout ----$/,/^stack backtrace:/p' "$log" | grep -vE '^stack backtrace:'
    exit 1
fi
exit 0
