#!/usr/bin/env bash
# Installs Debian's `prometheus` for the remote-write tests (tests/remote_write.rs) when
# it is missing. Idempotent. Its system service is never started: package scripts are
# told not to (policy-rc.d answers 101 while installing), and the tests run the binary
# themselves with their own config and storage directory.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if command -v prometheus >/dev/null; then
    exit 0
fi
command -v apt-get >/dev/null ||
    die "prometheus is missing and there is no apt-get to install it: install prometheus yourself (or put its binary on PATH)"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null ||
        die "prometheus is missing; installing it needs root: run 'apt-get install -y --no-install-recommends prometheus' as root"
    sudo=(sudo)
fi
log "installing prometheus with apt-get (for tests/remote_write.rs; its service is not started)"
policy=/usr/sbin/policy-rc.d
created_policy=false
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    created_policy=true
fi
cleanup() { if $created_policy; then "${sudo[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT
"${sudo[@]}" apt-get update ||
    die "apt-get update failed: check the network and /etc/apt/sources.list"
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends prometheus ||
    die "apt-get install prometheus failed (see above)"
command -v prometheus >/dev/null || die "prometheus is still not on PATH after installing it"
