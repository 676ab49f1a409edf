#!/usr/bin/env bash
# Installs Debian's headless Chromium (`chromium`, `chromium-driver`) for the history
# page test (tests/history_page.rs) when it is missing. Idempotent.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
command -v apt-get >/dev/null ||
    die "chromium is missing and there is no apt-get to install it: install chromium and chromium-driver yourself"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null ||
        die "chromium is missing; installing it needs root: run 'apt-get install -y chromium chromium-driver' as root"
    sudo=(sudo)
fi
log "installing chromium and chromium-driver with apt-get (for tests/history_page.rs)"
"${sudo[@]}" apt-get update ||
    die "apt-get update failed: check the network and /etc/apt/sources.list"
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y chromium chromium-driver ||
    die "apt-get install chromium chromium-driver failed (see above)"
command -v chromium >/dev/null || die "chromium is still not on PATH after installing it"
