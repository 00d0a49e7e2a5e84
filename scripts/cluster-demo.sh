#!/usr/bin/env bash
# Three chat nodes on three hosts, Redis on a fourth, and people on each:
# a line said on one host reaches the room's members on the other two.
#
# The hosts are network namespaces on this machine (as root): wharf-n1,
# wharf-n2, wharf-n3 run `wharf chat --framing lines --cluster
# redis://10.77.0.10:6379`, wharf-redis runs redis-server, and all four
# hang off a bridge in a fifth namespace (wharf-sw), a switch: nothing is
# added to this machine's own network. On each host two people connect to
# their local node, as `nc` would; one on host 1 speaks, then one on host
# 3, and the script checks that all six saw both lines, once each.
#
# Every step is bounded; the namespaces and processes are removed at the
# end, whatever happens. Run from anywhere: `bash scripts/cluster-demo.sh`
# (it builds the release binary if it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "cluster-demo: needs root (it makes network namespaces)" >&2
    exit 1
fi
command -v ip >/dev/null || { echo "cluster-demo: needs iproute2 (ip)" >&2; exit 1; }
bash scripts/need-redis.sh >/dev/null
wharf="${CARGO_TARGET_DIR:-target}/release/wharf"
[[ -x "$wharf" ]] || cargo build --release -p wharf-cli
wharf="$(cd "$(dirname "$wharf")" && pwd)/wharf"

hosts=(redis n1 n2 n3)
declare -A ip=([redis]=10.77.0.10 [n1]=10.77.0.1 [n2]=10.77.0.2 [n3]=10.77.0.3)
work=$(mktemp -d)
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${pids[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    for h in "${hosts[@]}" sw; do ip netns del "wharf-$h" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
cleanup_stale() {
    for h in "${hosts[@]}" sw; do ip netns del "wharf-$h" 2>/dev/null || true; done
}
cleanup_stale

echo "--- the network: four hosts on one switch (10.77.0.0/24)"
ip netns add wharf-sw
ip -n wharf-sw link add br0 type bridge
ip -n wharf-sw link set br0 up
for h in "${hosts[@]}"; do
    ns="wharf-$h"
    ip netns add "$ns"
    ip link add "wh-$h" type veth peer name "sw-$h"
    ip link set "wh-$h" netns "$ns"
    ip link set "sw-$h" netns wharf-sw
    ip -n wharf-sw link set "sw-$h" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "${ip[$h]}/24" dev "wh-$h"
    ip -n "$ns" link set "wh-$h" up
    echo "host $h: ${ip[$h]}"
done

echo "--- redis-server on host redis"
ip netns exec wharf-redis redis-server --bind "${ip[redis]}" --port 6379 \
    --protected-mode no --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    ip netns exec wharf-n1 redis-cli -h "${ip[redis]}" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done

echo "--- a chat node on each of n1, n2, n3"
for h in n1 n2 n3; do
    ip netns exec "wharf-$h" "$wharf" chat --framing lines --addr "${ip[$h]}:7000" \
        --cluster "redis://${ip[redis]}:6379" --duration 60 >"$work/$h.log" 2>&1 &
    pids+=($!)
done
for h in n1 n2 n3; do
    for _ in $(seq 100); do
        grep -q "listening on" "$work/$h.log" && break
        sleep 0.1
    done
    grep -q "listening on" "$work/$h.log" || { cat "$work/$h.log"; echo "FAIL: node $h"; exit 1; }
done

echo "--- two people on each host, connected to their own host's node"
# Each person: a small nc-like client in the host's namespace. It sets a
# nick, waits for the go (a file), says its line if it has one, and
# records every line it gets for a few seconds.
person() {
    local host=$1 nick=$2 say=$3
    ip netns exec "wharf-$host" timeout 20 python3 - "${ip[$host]}" "$nick" "$say" "$work" <<'PY' \
        >"$work/$nick.out" 2>&1 &
import os, socket, sys, time
addr, nick, say, work = sys.argv[1:5]
s = socket.create_connection((addr, 7000), timeout=10)
s.sendall(f"/nick {nick}\r\n".encode())
open(f"{work}/{nick}.ready", "w").close()
while not os.path.exists(f"{work}/go"):
    time.sleep(0.05)
if say:
    # The first speaker at once, the second a moment later: two lines, in
    # a known order.
    time.sleep(0.0 if nick.endswith("1") else 0.5)
    s.sendall(f"{say}\r\n".encode())
end = time.time() + 3
buf = b""
s.settimeout(0.2)
while time.time() < end:
    try:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    except socket.timeout:
        pass
sys.stdout.write(buf.decode(errors="replace"))
PY
    pids+=($!)
}
person n1 alice1 "hello from host 1"
person n1 bob1 ""
person n2 carol2 ""
person n2 dave2 ""
person n3 erin3 "hello from host 3"
person n3 frank3 ""
people=(alice1 bob1 carol2 dave2 erin3 frank3)
for p in "${people[@]}"; do
    for _ in $(seq 100); do [[ -f "$work/$p.ready" ]] && break; sleep 0.1; done
done
# Every node subscribed to the lobby on the broker before anyone speaks.
for _ in $(seq 100); do
    n=$(ip netns exec wharf-n1 redis-cli -h "${ip[redis]}" pubsub numsub wharf-chat:g:lobby | tail -1)
    [[ "$n" == 3 ]] && break
    sleep 0.1
done
echo "nodes subscribed to the lobby: $n"
sleep 0.3  # the nick changes are through
touch "$work/go"
wait "${pids[@]: -6}" 2>/dev/null || true

echo "--- what each person saw"
fail=0
for p in "${people[@]}"; do
    out=$(tr -d '\r' <"$work/$p.out")
    said=$(grep '^\[lobby\] ' <<<"$out" || true)
    echo "$p:"
    sed 's/^/    /' <<<"$said"
    want=$'[lobby] alice1: hello from host 1\n[lobby] erin3: hello from host 3'
    if [[ "$said" != "$want" ]]; then
        echo "FAIL: $p did not see both lines, once each, in order"
        fail=1
    fi
done
echo "--- the broker: $(ip netns exec wharf-n1 redis-cli -h "${ip[redis]}" info stats \
    | tr -d '\r' | grep -E '^pubsub_channels|^total_commands_processed' | tr '\n' ' ')"
if [[ $fail -ne 0 ]]; then
    for h in n1 n2 n3; do echo "== node $h"; cat "$work/$h.log"; done
    exit 1
fi
echo "cluster demo: lines said on host 1 and host 3 reached every member on all three hosts"
