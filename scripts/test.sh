#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian 12 machine, then run the whole suite:
# lint, types, and pytest (unit tests, the fake upstream, and the real clients and registry).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real parts the tests drive: the upstream registry (CNCF distribution), and the clients.
DEBS=(docker-registry skopeo docker.io containerd apache2-utils nginx-light curl wrk)
missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

python3 -m ruff check proxy tests loadtests
python3 -m mypy proxy tests loadtests
python3 -m pytest -q "$@"
