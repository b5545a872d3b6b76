#!/bin/sh
# Installs promtool and prometheus, from Debian's `prometheus` package, when either is
# missing; prints promtool's path. The tests run both (promtool checks the exposition and
# deploy/prometheus.yml; tests/prometheus.rs starts its own prometheus server on a free
# port). Runs as root or through sudo, asks no question, and starts no service: service
# starts are denied through policy-rc.d while the package is configured, and its boot-time
# start is disabled afterwards (the tests start the binary themselves).
set -eu

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    command -v promtool
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "install-promtool: need root or sudo to install the prometheus package" >&2
    exit 1
fi

# Put a deny-all policy-rc.d in place for the install, keeping any existing one aside.
POLICY=/usr/sbin/policy-rc.d
SAVED="$POLICY.install-promtool"
restore_policy() {
    $SUDO rm -f "$POLICY"
    if [ -e "$SAVED" ]; then
        $SUDO mv "$SAVED" "$POLICY"
    fi
}
if [ -e "$POLICY" ]; then
    $SUDO mv "$POLICY" "$SAVED"
fi
trap restore_policy EXIT
trap 'exit 130' INT TERM
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
$SUDO chmod 755 "$POLICY"

$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    prometheus >/dev/null

# Do not let the server start at the next boot either.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable prometheus.service >/dev/null 2>&1 || true
elif command -v update-rc.d >/dev/null 2>&1; then
    $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
fi

for tool in promtool prometheus; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-promtool: the prometheus package installed no $tool" >&2
        exit 1
    fi
done
promtool --version >/dev/null
prometheus --version >/dev/null 2>&1
command -v promtool
