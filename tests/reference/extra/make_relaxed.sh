#!/usr/bin/env bash
# Regenerate tests/reference/extra/relaxed_extra.json (tight lme4 random-slope refits).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="$(cd "$here/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for c in unbalanced hetero_corr; do
  python3 -c "import sys, polars as pl; pl.read_parquet(sys.argv[1]).write_csv(sys.argv[2])" \
    "$ref/$c.parquet" "$tmp/$c.csv"
done
Rscript "$here/make_relaxed.R" "$tmp" "$here/relaxed_extra.json"
