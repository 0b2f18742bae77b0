#!/usr/bin/env bash
# Run the embedded asyncrl demo: set up .venv if needed, then `asyncrl demo` (args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/asyncrl demo "$@"
