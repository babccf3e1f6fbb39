#!/usr/bin/env bash
# Install the Prometheus server from Debian's `prometheus` package, once, for the integration tests
# (tests/integration/test_prometheus.py) and for checking deploy/prometheus/ by hand.
#
#   deploy/prometheus/install-prometheus.sh        # prints the path of the prometheus binary on stdout
#
# Idempotent: when `prometheus` is on PATH nothing is installed. Otherwise needs root (or passwordless
# sudo) and apt: `apt-get update -qq`, then the package without its recommendations (no node exporter).
# The package's system service is NOT started: while installing, a temporary /usr/sbin/policy-rc.d (exit 101,
# "action forbidden") tells invoke-rc.d and deb-systemd-invoke to leave it alone, unless the machine already
# has a policy-rc.d (a Docker image has one that does the same); afterwards `systemctl disable` undoes the
# package's enabling it for the next boot. The tests run their own `prometheus` process with their own
# configuration and storage. Logs go to stderr, so
# `PROMETHEUS=$(deploy/prometheus/install-prometheus.sh)` works.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
  command -v prometheus
  exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install-prometheus.sh: prometheus is not installed and installing it needs root:" \
       "run 'apt-get install prometheus' as root, or put a prometheus binary on PATH" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-prometheus.sh: no apt-get here; install Prometheus (https://prometheus.io/download/)" \
       "and put the prometheus binary on PATH" >&2
  exit 1
fi

POLICY=/usr/sbin/policy-rc.d
if [[ ! -e "$POLICY" ]]; then
  "${SUDO[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
  trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi

echo "install-prometheus.sh: installing Debian's prometheus package (service not started)" >&2
start=$(date +%s)
"${SUDO[@]}" apt-get update -qq >&2
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends prometheus >&2
# The package also enables its service for the next boot; undo that too (no-op where systemd is absent).
if command -v systemctl >/dev/null 2>&1; then
  "${SUDO[@]}" systemctl disable prometheus.service >&2 || true
fi
echo "install-prometheus.sh: installed $(prometheus --version 2>&1 | head -n1) in $(( $(date +%s) - start ))s" >&2
command -v prometheus
