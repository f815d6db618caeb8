#!/usr/bin/env bash
# What `make demo` runs: `moon demo` on the built-in product world (see README "What make demo does").
# Extra arguments go to `moon demo` (e.g. --quick). Stages are cached under the output directory.
set -euo pipefail
out=${1:-demo-out}
shift || true
exec .venv/bin/moon demo --out "$out" "$@"
