#!/usr/bin/env bash
# Regenerate tests/reference/extra/lme4_rank.json (tests/data/test_rank.py).
# Converts exam_factors.parquet to CSV in a temporary directory (R here has no
# arrow package) and runs make_rank.R. Needs python3 + polars, Rscript with
# lme4 and jsonlite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="$(cd "$here/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -c "import sys, polars as pl; pl.read_parquet(sys.argv[1]).write_csv(sys.argv[2])" \
  "$ref/exam_factors.parquet" "$tmp/exam_factors.csv"
Rscript "$here/make_rank.R" "$tmp/exam_factors.csv" "$here/lme4_rank.json"
