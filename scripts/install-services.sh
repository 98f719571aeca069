#!/usr/bin/env bash
# Installs what the tests start or drive (Debian/Ubuntu, as root or with sudo): the Redis and etcd
# servers of the discovery tests, Chromium and its driver for the dashboard's browser test, and
# promtool (Debian's prometheus package) for the alert rules. The tests start their own instances.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq redis-server etcd-server chromium chromium-driver prometheus >/dev/null
# The packages start system services we do not use; the tests run their own instances on free ports.
$SUDO systemctl disable --now redis-server etcd prometheus >/dev/null 2>&1 || true
