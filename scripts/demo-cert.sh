#!/usr/bin/env bash
# Makes the demo's self-signed certificate for localhost and 127.0.0.1 (once; kept after) and
# prints the directory holding cert.pem and key.pem. Usage: scripts/demo-cert.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-target/demo-tls}
if [ ! -s "$DIR/cert.pem" ] || [ ! -s "$DIR/key.pem" ]; then
  mkdir -p "$DIR"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 365 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$DIR/key.pem" -out "$DIR/cert.pem" 2>/dev/null
  echo "demo-cert: generated a self-signed certificate in $DIR" >&2
fi
echo "$DIR"
