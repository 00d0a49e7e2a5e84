#!/usr/bin/env bash
# Builds wharf for Windows (x86_64-pc-windows-gnu) and runs it under Wine:
# every integration test binary of the library (on the IOCP backend), then a
# round trip of the `wharf` command: `wharf.exe echo` serving, `wharf.exe
# load` driving it with byte checks, both under Wine, over loopback.
#
# On a fresh Debian machine it installs what it lacks: the rustup target,
# the MinGW-w64 cross compiler (to build a stand-in DLL, see below) and
# Wine. Run from anywhere: `bash scripts/test-windows.sh`.
#
# Wine runs Windows programs on Linux's network stack: these runs show that
# the Windows build works (functional parity), not how fast Windows is.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-pc-windows-gnu
section() { printf '\n--- %s ---\n' "$*"; }

# --- what the run needs -----------------------------------------------------
section "toolchain"
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
missing=()
command -v x86_64-w64-mingw32-gcc >/dev/null || missing+=(gcc-mingw-w64-x86-64)
command -v wine >/dev/null || missing+=(wine64 wine)
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
wine --version 2>/dev/null || true

target_dir="${CARGO_TARGET_DIR:-target}"
target_dir="$(mkdir -p "$target_dir" && cd "$target_dir" && pwd)"
out="$target_dir/$target/debug"
work="$target_dir/wine"
mkdir -p "$work"

# --- build ------------------------------------------------------------------
section "cargo clippy and build for $target"
cargo clippy --workspace --all-targets --target "$target" -- -D warnings
cargo build -p wharf-cli --target "$target"
cargo test -p wharf --features redis,prometheus,tls --target "$target" --no-run --message-format=json >"$work/build.json"
mapfile -t tests < <(python3 - "$work/build.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    # The integration tests and the library's own unit tests (which
    # include driver-level tests of the backend).
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["profile"]["test"] and m["target"]["kind"] in (["test"], ["lib"])):
        print(m["executable"])
PY
)
echo "test binaries: ${#tests[@]}"

# Rust's standard library imports ProcessPrng from bcryptprimitives.dll,
# which Wine 8 lacks: a stand-in that fills the buffer with RtlGenRandom
# (SystemFunction036 in advapi32), put next to the executables.
section "stand-in bcryptprimitives.dll"
cat >"$work/bcryptprimitives.c" <<'C'
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
C
x86_64-w64-mingw32-gcc -O2 -shared -o "$work/bcryptprimitives.dll" \
    "$work/bcryptprimitives.c" -ladvapi32
for dir in "$out" "$out/deps"; do
    cp "$work/bcryptprimitives.dll" "$dir/"
done
echo "built $work/bcryptprimitives.dll"

# --- Wine -------------------------------------------------------------------
export WINEPREFIX="$work/prefix"
export WINEDEBUG=-all
# The stand-in, native; no Mono or Gecko install prompts for the prefix.
export WINEDLLOVERRIDES="bcryptprimitives=n;mscoree=;mshtml="
export WINEARCH=win64
# Tests skip their time bounds (loudly) under Wine: its timings are not
# Windows' (see `timing_bounds_apply` in wharf/tests/util).
export WHARF_UNDER_WINE=1
# Every run below is bounded; this ends the prefix's own wineserver.
cleanup() {
    [[ -n "${server:-}" ]] && kill -KILL "$server" 2>/dev/null
    if [[ -n "${redis:-}" ]]; then
        kill -KILL "$redis" 2>/dev/null
        wait "$redis" 2>/dev/null || true
    fi
    wineserver -k 2>/dev/null || true
}
trap cleanup EXIT
if [[ ! -f "$WINEPREFIX/system.reg" ]]; then
    section "creating the Wine prefix"
    timeout 300 wineboot -i >/dev/null 2>&1 || true
    wineserver -w 2>/dev/null || true
fi

# --- the broker of the cluster tests -----------------------------------------
# A Linux redis-server on a free port: the tests under Wine cannot start
# one themselves (see wharf/tests/util/redis.rs), so they are given its
# address.
section "redis-server for the cluster tests"
bash scripts/need-redis.sh
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
redis=$!
export WHARF_TEST_REDIS="127.0.0.1:$redis_port"
echo "redis-server on $WHARF_TEST_REDIS"

# --- the integration suite --------------------------------------------------
section "unit and integration tests under Wine (IOCP backend)"
passed=0
failed=0
ignored=0
failures=()
for exe in "${tests[@]}"; do
    name=$(basename "$exe" .exe)
    name=${name%-*}
    log="$work/$name.log"
    status=0
    # --nocapture: the tests' SKIPPED lines must show.
    timeout 600 wine "$exe" --test-threads=2 --nocapture >"$log" 2>&1 || status=$?
    if [[ $status -ne 0 ]] && ! grep -aq '^running [0-9]* test' "$log"; then
        # Not one line from the test harness: the program never ran (Wine
        # failed to start it, as it does now and then), so no test of it
        # failed. Once more, and if it fails again that is reported.
        echo "RETRY: $name exited with $status before running any test ($(wc -c <"$log") bytes of output)"
        status=0
        timeout 600 wine "$exe" --test-threads=2 --nocapture >"$log" 2>&1 || status=$?
    fi
    result=$(grep -a '^test result:' "$log" | tail -1 | tr -d '\r' || true)
    if [[ $status -ne 0 || -z "$result" ]]; then
        echo "FAILED: $name (exit $status)"
        tail -40 "$log" | tr -d '\r'
        failures+=("$name")
        failed=$((failed + 1))
        continue
    fi
    echo "$name: $result"
    p=$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$result")
    f=$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<<"$result")
    i=$(sed -n 's/.* \([0-9]*\) ignored.*/\1/p' <<<"$result")
    passed=$((passed + ${p:-0}))
    failed=$((failed + ${f:-0}))
    ignored=$((ignored + ${i:-0}))
done

# --- the command: echo served, load driving it ------------------------------
# Both are Windows programs under Wine: the server accepts with AcceptEx, the
# load generator connects with ConnectEx, and every echoed byte is checked.
section "wharf.exe echo + wharf.exe load under Wine"
roundtrip=ok
: >"$work/echo.log" # (not an earlier run's, see the chat below)
wine "$out/wharf.exe" echo --addr 127.0.0.1:0 --threads 2 --duration 20 \
    >"$work/echo.log" 2>&1 &
server=$!
addr=""
for _ in $(seq 300); do
    addr=$(tr -d '\r' <"$work/echo.log" | sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' | head -1)
    [[ -n "$addr" ]] && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$addr" ]]; then
    echo "FAILED: wharf.exe echo printed no address"
    roundtrip=failed
else
    echo "wharf.exe echo is listening on $addr"
    status=0
    timeout 120 wine "$out/wharf.exe" load "$addr" --connections 20 --size 1000 \
        --inflight 4 --duration 3 --warmup 0.5 --json "$work/load.json" \
        >"$work/load.log" 2>&1 || status=$?
    tr -d '\r' <"$work/load.log" | grep -v '^ *[0-9.]* s *|' || true
    if [[ $status -ne 0 ]]; then
        echo "FAILED: wharf.exe load exited with $status"
        roundtrip=failed
    elif ! python3 - "$work/load.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bad = {k: r[k] for k in ("errors", "connections_failed", "connections_dropped") if r[k]}
if not r["ok"] or bad:
    sys.exit(f"the load report is not clean: {bad}")
PY
    then
        roundtrip=failed
    fi
fi
# --duration ends the server; it must exit cleanly.
status=0
for _ in $(seq 300); do
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$server" 2>/dev/null; then
    echo "FAILED: wharf.exe echo still running after its --duration"
    roundtrip=failed
else
    wait "$server" || status=$?
    if [[ $status -ne 0 ]]; then
        echo "FAILED: wharf.exe echo exited with $status"
        roundtrip=failed
    fi
fi
server=""
tr -d '\r' <"$work/echo.log" | grep -v '^conns ' || true
[[ $roundtrip == ok ]] && passed=$((passed + 1)) || failed=$((failed + 1))

# --- the chat, as people use it: nc-style clients on its line protocol -----
# wharf.exe chat --framing lines under Wine (IOCP), two clients from Linux:
# nicks, a room, a line said in it, a notice for an unknown command.
section "wharf.exe chat --framing lines under Wine, nc-style clients"
chat=ok
# Emptied first: the redirection happens in the background child, and a
# read before it would find no file.
: >"$work/chat.log"
wine "$out/wharf.exe" chat --framing lines --addr 127.0.0.1:0 --threads 2 --duration 30 \
    >"$work/chat.log" 2>&1 &
server=$!
addr=""
for _ in $(seq 300); do
    addr=$(tr -d '\r' <"$work/chat.log" | sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' | head -1)
    [[ -n "$addr" ]] && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$addr" ]]; then
    echo "FAILED: wharf.exe chat printed no address"
    chat=failed
elif ! timeout 60 python3 - "$addr" <<'PY'
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)

class Nc:
    def __init__(self):
        self.s = socket.create_connection((host, int(port)), timeout=20)
        self.buf = b""
    def say(self, text):
        self.s.sendall(text.encode() + b"\r\n")
    def line(self):
        while b"\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                sys.exit("the chat closed the connection")
            self.buf += d
        l, self.buf = self.buf.split(b"\r\n", 1)
        return l.decode()
    def until(self, want):
        while True:
            l = self.line()
            if l == want:
                return
            if not l.startswith("* "):
                sys.exit(f"got {l!r} waiting for {want!r}")

a, b = Nc(), Nc()
for c, nick in ((a, "alice"), (b, "bob")):
    c.say(f"/nick {nick}")
    c.say("/join wine")
    c.until(f"* {nick} joined [wine]")
a.until("* bob joined [wine]")
a.say("hello from linux")
for c in (a, b):
    c.until("[wine] alice: hello from linux")
b.say("/frobnicate")
b.until("* unknown command /frobnicate: /help lists the commands")
print("chat under Wine: nicks, a room, a line said in it, a notice")
PY
then
    chat=failed
fi
# (The clean exit is the echo's test above; this one is stopped.)
kill -KILL "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
wineserver -k 2>/dev/null || true
server=""
[[ $chat == ok ]] && passed=$((passed + 1)) || failed=$((failed + 1))

section "summary (Wine is not Windows: these are functional results, not speed)"
echo "skipped under Wine (each test says why):"
for exe in "${tests[@]}"; do
    name=$(basename "$exe" .exe)
    name=${name%-*}
    grep -a -h 'SKIPPED' "$work/$name.log" 2>/dev/null | tr -d '\r' | sort -u | sed "s/^/  [$name] /"  || true
done
if ((${#failures[@]})); then
    echo "failed test binaries: ${failures[*]}"
fi
echo "round trip (wharf.exe echo + wharf.exe load): $roundtrip"
echo "chat (wharf.exe chat --framing lines, nc-style clients): $chat"
echo "ignored (#[ignore], long variants, as on Linux): $ignored"
echo "windows: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
