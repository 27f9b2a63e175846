#!/usr/bin/env bash
# Install ocicache into a virtual environment of its own (.venv) and run the proxy. Arguments
# go to `ocicache serve`; with none it runs on its embedded defaults (0.0.0.0:5000, Docker Hub
# as the default upstream, cache in ~/.cache/ocicache).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/venv.sh
exec .venv/bin/ocicache serve "$@"
