#!/usr/bin/env bash
# Regenerate tests/reference/extra/smallfix.json (needs python3 + polars, Rscript with lmerTest, jsonlite).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="$(cd "$here/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -c "import sys, polars as pl; pl.read_parquet(sys.argv[1]).write_csv(sys.argv[2])" "$ref/unbalanced.parquet" "$tmp/unbalanced.csv"
cp "$ref/smallfix_sing.csv" "$tmp/"
Rscript "$here/make_smallfix.R" "$tmp" "$here/smallfix.json"
