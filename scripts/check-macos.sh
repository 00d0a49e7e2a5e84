#!/usr/bin/env bash
# Type-checks the workspace for macOS (the poll backend on kqueue), which
# proves the code compiles without io_uring. Linking needs Apple's SDK, which
# this machine does not have, so this is `cargo check`, not a build.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-apple-darwin
if ! rustup target list --installed | grep -qx "$target"; then
    if ! rustup target add "$target"; then
        echo "SKIPPED: rustup could not install the $target standard library here;"
        echo "         the macOS check did not run."
        exit 0
    fi
fi
# ring (the TLS provider) compiles its C for the target even for a check:
# clang can target macOS, and ring's own switch for cross builds without a
# C library (RING_CORE_NOSTDLIBINC) leaves one SDK header to stand in for,
# the target macros. Nothing is linked, so nothing of this reaches a binary.
if ! command -v clang >/dev/null; then
    echo "installing clang (to compile ring's C for the macOS check)"
    if ! { apt-get update -qq && apt-get install -y -qq clang; } >/dev/null; then
        echo "SKIPPED: clang could not be installed; the macOS check did not run."
        exit 0
    fi
fi
sdk=$(mktemp -d)
trap 'rm -rf "$sdk"' EXIT
cat >"$sdk/TargetConditionals.h" <<'EOF_H'
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_TV 0
#define TARGET_OS_SIMULATOR 0
EOF_H
export CC_x86_64_apple_darwin=clang
export CFLAGS_x86_64_apple_darwin="-ffreestanding -DRING_CORE_NOSTDLIBINC=1 -I$sdk"
RUSTFLAGS="-D warnings" cargo check -p wharf --features redis,prometheus,tls --all-targets --target "$target"
echo "macOS check: ok"
