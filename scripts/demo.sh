#!/usr/bin/env bash
# A newcomer's first run: install what the gateway needs (no QEMU), then `gateway demo`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scripts/setup.sh >/dev/null
exec .venv/bin/gateway demo "$@"
