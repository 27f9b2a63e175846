#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian or Ubuntu machine, then run the whole
# suite: lint, types, and pytest (unit tests, the fake upstream, and the real clients and
# registry). Python packages go into a virtual environment this script creates (.venv), since
# Debian 12 and Ubuntu 24.04 refuse `pip install` outside one (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real parts the tests drive: the upstream registry (CNCF distribution), the clients, and the
# servers the benchmarks compare against, and Redis for replicas. python3-venv: Debian ships venv
# without ensurepip.
DEBS=(python3 python3-venv docker-registry skopeo docker.io containerd apache2-utils nginx-light curl wrk zsh redis-server)
missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

./scripts/venv.sh test
PY=.venv/bin/python

$PY -m ruff check proxy tests loadtests
$PY -m mypy proxy tests loadtests
exec $PY -m pytest -q "$@"
