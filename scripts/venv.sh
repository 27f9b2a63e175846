#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install ocicache into it,
# with the optional dependency group named by $1 (e.g. "test"). Used by serve.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1:-}"
# The system interpreter: on Debian and Ubuntu that is the one `apt` keeps up to date.
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian and Ubuntu ship venv without ensurepip until python3-venv is installed.
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf .venv
    "$PYTHON" -m venv .venv
  fi
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
