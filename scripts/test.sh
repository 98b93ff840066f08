#!/usr/bin/env bash
# Run every test, after installing everything the tests need (see scripts/setup.sh --full).
# Extra arguments go to pytest, e.g. scripts/test.sh -k differential.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scripts/setup.sh --full
.venv/bin/ruff check .
exec .venv/bin/pytest -v -p no:cacheprovider "$@"
