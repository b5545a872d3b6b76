#!/usr/bin/env bash
# Installs the system packages stoa needs to build and test, where they are missing.
# Debian/Ubuntu; runs apt-get as root (or through sudo when available).
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The demo's self-signed certificate (scripts/demo-cert.sh).
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
# The system roots https upstreams are verified against by default.
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
# The cluster tests start a real Redis (tests/common/redis.rs); `make run` needs none.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# tests/status_page.rs drives the admin status page in a headless Chromium over WebDriver.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "install-deps: missing ${need[*]}, and not root: install them and retry" >&2
  exit 1
fi

echo "install-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
