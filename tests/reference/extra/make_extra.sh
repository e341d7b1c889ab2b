#!/usr/bin/env bash
# Regenerate tests/reference/extra/lme4_extra.json.
# Converts the case Parquet files to CSV in a temporary directory (R here has
# no arrow package) and runs make_extra.R. Needs python3 + polars, Rscript with
# lme4 and jsonlite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="$(cd "$here/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for c in seed_balanced unbalanced hetero_corr pastes egsingle medium; do
  python3 -c "import sys, polars as pl; pl.read_parquet(sys.argv[1]).write_csv(sys.argv[2])" \
    "$ref/$c.parquet" "$tmp/$c.csv"
done
Rscript "$here/make_extra.R" "$tmp" "$ref" "$here/lme4_extra.json"
