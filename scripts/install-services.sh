#!/usr/bin/env bash
# Installs the Redis and etcd server binaries the discovery tests start (Debian/Ubuntu, as root).
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq redis-server etcd-server >/dev/null
# The packages start system services we do not use; the tests run their own instances on free ports.
$SUDO systemctl disable --now redis-server etcd >/dev/null 2>&1 || true
