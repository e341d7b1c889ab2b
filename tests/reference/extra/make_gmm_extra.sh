#!/usr/bin/env bash
# Regenerate tests/reference/extra/gmm_extra.json (needs python3 + polars, Rscript with lavaan, jsonlite).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="$(cd "$here/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for c in hs_cfa hs_cfa_missing; do
  python3 -c "import sys, polars as pl; pl.read_parquet(sys.argv[1]).write_csv(sys.argv[2])" \
    "$ref/$c.parquet" "$tmp/$c.csv"
done
Rscript "$here/make_gmm_extra.R" "$tmp" "$here/gmm_extra.json"
