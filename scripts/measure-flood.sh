#!/usr/bin/env bash
# The cost of a connect flood that the accept rate limit refuses: a wharf
# echo server (one io_uring loop, pinned to CPU 0, --accept-rate-per-ip
# 100/s) serves one client at 1,000 messages a second from 127.0.0.1 (the
# load generator, pinned to CPU 1), with and without a flood of 10,000
# connects a second from 127.0.0.2. Five interleaved rounds; the server's
# CPU and the refusals come from its own Prometheus endpoint, the client's
# latency from `wharf load`. Prints each round and the medians.
#
#   bash scripts/measure-flood.sh [ROUNDS] [FLOOD_PER_SEC]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
flood=${2:-10000}
cargo build --release -q
wharf=target/release/wharf
out=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
mport=$((port + 1))
taskset -c 0 "$wharf" echo --addr 127.0.0.1:$port --threads 1 --backend uring \
    --metrics 127.0.0.1:$mport --accept-rate-per-ip 100/s >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$out"' EXIT
for _ in $(seq 50); do
    grep -q "metrics at" "$out/server.log" 2>/dev/null && break
    sleep 0.1
done
for i in $(seq "$rounds"); do
    for mode in flood quiet; do
        extra=()
        [ "$mode" = flood ] && extra=(--flood "$flood/s")
        taskset -c 1 "$wharf" load 127.0.0.1:$port --connections 1 --rate 1000 \
            --duration 3 --warmup 0.5 --metrics 127.0.0.1:$mport "${extra[@]}" \
            --json "$out/$mode-$i.json" >/dev/null 2>&1
    done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {"flood": [], "quiet": []}
for i in range(1, rounds + 1):
    for mode in rows:
        r = json.load(open(f"{out}/{mode}-{i}.json"))
        s = r["server"]
        refused = sum(s["refused"].values())
        rows[mode].append((100 * s["cpu_secs"] / r["duration_secs"], refused, s["opened"],
                           r["latency_us"]["p50"], r["latency_us"]["p99"], r["ok"]))
        print(f"round {i} {mode:5}: server CPU {rows[mode][-1][0]:5.1f}% of a core, "
              f"{refused} refused, {s['opened']} accepted; client p50 {r['latency_us']['p50']:.0f} µs "
              f"p99 {r['latency_us']['p99']:.0f} µs, ok={r['ok']}")
med = {m: [statistics.median(c) for c in zip(*[row[:5] for row in v])] for m, v in rows.items()}
f, q = med["flood"], med["quiet"]
extra = (f[0] - q[0]) / 100 * 3.0  # CPU seconds over a 3 s window
print(f"median flood: server CPU {f[0]:.1f}% ({f[1]:.0f} refused, {f[2]:.0f} accepted), client p50 {f[3]:.0f} µs p99 {f[4]:.0f} µs")
print(f"median quiet: server CPU {q[0]:.1f}%, client p50 {q[3]:.0f} µs p99 {q[4]:.0f} µs")
if f[1]:
    print(f"server CPU per refused connect: {extra * 1e6 / f[1]:.1f} µs")
if not all(row[5] for v in rows.values() for row in v):
    sys.exit("a load run was not ok (errors or failed connections)")
PY
