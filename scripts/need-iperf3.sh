#!/usr/bin/env bash
# Installs iperf3 (the line rate of one TCP stream, next to which
# `wharf bench --files` puts wharf's file transfer) from the system's
# packages when it is missing. `wharf bench --files` calls it.
set -euo pipefail
if command -v iperf3 >/dev/null; then
    exit 0
fi
sudo=""
[[ $(id -u) -ne 0 ]] && sudo=sudo
if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
    iperf3 >/dev/null 2>&1; then
    $sudo apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
        iperf3 >/dev/null
fi
iperf3 --version | head -1
