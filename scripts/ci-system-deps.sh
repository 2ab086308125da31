#!/usr/bin/env bash
# System packages the integration tests use (Debian/Ubuntu): PostgreSQL server binaries (tests start
# their own cluster with initdb), headless Chromium + chromedriver (UI test), docker-compose v1 (validates
# infra/compose.yaml offline; no Docker daemon needed). Idempotent: a no-op (well under a second) when
# everything is installed; otherwise one quiet apt-get update + install.
set -euo pipefail
PACKAGES=(postgresql chromium chromium-driver docker-compose)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "ci-system-deps: apt-get not found; install ${missing[*]} by hand (tests needing them will skip)" >&2
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "ci-system-deps: not root and no sudo; missing ${missing[*]} (tests needing them will skip)" >&2
    exit 0
  fi
fi
echo "ci-system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# the postgresql package would start a system-wide cluster on 5432; tests use their own, so keep it off
if [[ " ${missing[*]} " == *" postgresql "* ]] && [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
