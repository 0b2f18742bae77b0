#!/usr/bin/env bash
# Run the whole asyncrl check suite: set up .venv if needed, lint, type-check, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not integration"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=".venv/bin/python"
export ASYNCRL_REQUIRE_KERNEL=1  # setup.py's C kernel must have built (it is optional to install)
"$PY" -m ruff check asyncrl tests benchmarks
"$PY" -m mypy
# pytest exits 5 when it collected no test; that is a failure here, like any non-zero code.
exec "$PY" -m pytest "$@"
