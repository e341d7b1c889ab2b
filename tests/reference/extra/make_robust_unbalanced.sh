#!/usr/bin/env bash
# Regenerate tests/reference/extra/lavaan_robust_unbalanced.json (make_robust_unbalanced.R).
# Needs python3 + polars and Rscript with lavaan and jsonlite; lavaan takes a few minutes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="$(cd "$here/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for c in seed_balanced unbalanced; do
  python3 -c "import sys, polars as pl; pl.read_parquet(sys.argv[1]).write_csv(sys.argv[2])" \
    "$ref/$c.parquet" "$tmp/$c.csv"
done
cp "$ref/seed_balanced.json" "$tmp/"
Rscript "$here/make_robust_unbalanced.R" "$tmp" "$here/lavaan_robust_unbalanced.json"
