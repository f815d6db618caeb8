#!/usr/bin/env bash
# What `make demo` runs. Today: the data path end to end — import a small MBE-format sample
# (real Open Clip Art images, one given as a URL and resolved by file name in --images; one row
# without an id, reported and skipped), then print the store's stats and validate it.
set -euo pipefail
out=${1:-demo-out}
moon=.venv/bin/moon
mkdir -p "$out"
echo "== importing examples/mbe_sample.jsonl into $out/mbe-sample"
$moon data import-mbe examples/mbe_sample.jsonl --out "$out/mbe-sample" \
  --images /usr/share/openclipart/png/food --query-columns text=query --split test --overwrite
echo "== stats"
$moon data stats "$out/mbe-sample"
echo "== validate"
$moon data validate "$out/mbe-sample"
