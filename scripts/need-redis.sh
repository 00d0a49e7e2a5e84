#!/usr/bin/env bash
# Installs redis-server and redis-tools (redis-cli, redis-benchmark) from
# the system's packages when they are missing. The tests that need a real
# broker call it; so does .ci/run. Run from anywhere.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
    && command -v redis-benchmark >/dev/null; then
    exit 0
fi
sudo=""
[[ $(id -u) -ne 0 ]] && sudo=sudo
if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
    redis-server redis-tools >/dev/null 2>&1; then
    $sudo apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
        redis-server redis-tools >/dev/null
fi
# The package starts a system-wide server on 6379; the project's tests
# start their own on free ports and never use it.
redis-server --version
