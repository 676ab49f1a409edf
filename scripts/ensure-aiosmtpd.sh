#!/usr/bin/env bash
# Makes a Python venv with aiosmtpd (from PyPI) for the SMTP tests that need a real
# server speaking STARTTLS, implicit TLS and AUTH (tests/smtp_tls.rs). Idempotent:
# does nothing when the venv can already import it. Prints nothing on success.
#   venv: $OSC_SMTP_VENV, default .dev/venv-smtp
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

AIOSMTPD_VERSION=1.4.6
venv=${OSC_SMTP_VENV:-$ROOT/.dev/venv-smtp}
if "$venv/bin/python" -c "import aiosmtpd, sys; sys.exit(aiosmtpd.__version__ != '$AIOSMTPD_VERSION')" 2>/dev/null; then
    exit 0
fi
# python3 with venv, and openssl (the tests make a throwaway certificate with it):
# installed with apt-get as root when missing, else we say what to install.
if ! { command -v python3 >/dev/null && python3 -c "import venv, ensurepip" 2>/dev/null &&
    command -v openssl >/dev/null; }; then
    [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null ||
        die "tests/smtp_tls.rs needs python3 with venv and openssl (Debian: apt-get install -y python3-venv openssl)"
    log "installing python3-venv and openssl with apt-get (for tests/smtp_tls.rs)"
    apt-get update && apt-get install -y python3-venv openssl ||
        die "apt-get install python3-venv openssl failed (see above)"
fi
log "creating $venv with aiosmtpd $AIOSMTPD_VERSION from PyPI (for tests/smtp_tls.rs)"
rm -rf "$venv"
python3 -m venv "$venv" || die "python3 -m venv $venv failed"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "aiosmtpd==$AIOSMTPD_VERSION" ||
    die "pip install aiosmtpd failed: check the network access to PyPI"
