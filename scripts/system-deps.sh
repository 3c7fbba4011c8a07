#!/usr/bin/env bash
# Installs the Debian packages some tests need (real Alertmanager, Chromium) when run as root, as CI is.
# A non-root user gets the list and the tests that need them skip with that reason.
set -euo pipefail
# Filled in by the issues that bring Alertmanager and browser tests.
PACKAGES=(prometheus-alertmanager chromium chromium-driver)
[ ${#PACKAGES[@]} -eq 0 ] && exit 0
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: not root; tests needing ${missing[*]} will be skipped (apt-get install ${missing[*]})"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "system-deps: installed ${missing[*]}"
