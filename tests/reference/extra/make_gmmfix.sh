#!/usr/bin/env bash
# Regenerate tests/reference/gmmfix_multilevel.parquet and tests/reference/extra/gmmfix.json
# (needs python with mlsem installed, Rscript with lavaan and jsonlite).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python "$here/make_gmmfix.py" "$tmp"
Rscript "$here/make_gmmfix.R" "$tmp" "$here/gmmfix.json"
