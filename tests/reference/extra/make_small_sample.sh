#!/usr/bin/env bash
# Regenerate tests/reference/extra/small_sample_extra.json (needs python3 + polars,
# Rscript with lmerTest, pbkrtest, jsonlite; R here has no arrow package).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="$(cd "$here/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for c in seed_balanced unbalanced sleepstudy pastes; do
  python3 -c "import sys, polars as pl; pl.read_parquet(sys.argv[1]).write_csv(sys.argv[2])" \
    "$ref/$c.parquet" "$tmp/$c.csv"
done
# a variance estimated at 0 (lme4: singular fit): simulated by mlsem itself
python3 -c "import sys, mlsem; mlsem.simulate(30, 2, 3, sd_school=0.0, seed=1).write_csv(sys.argv[1])" \
  "$tmp/boundary.csv"
Rscript "$here/make_small_sample.R" "$tmp" "$here/small_sample_extra.json"
