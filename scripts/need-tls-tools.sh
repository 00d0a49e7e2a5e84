#!/usr/bin/env bash
# Installs openssl (for `openssl s_client`, an independent TLS client in the
# tests) and python3 (its `ssl` module is another) from the system's
# packages when they are missing. The TLS tests and .ci/run call it.
set -euo pipefail
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
sudo=""
[[ $(id -u) -ne 0 ]] && sudo=sudo
if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
    "${missing[@]}" >/dev/null 2>&1; then
    $sudo apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
openssl version
