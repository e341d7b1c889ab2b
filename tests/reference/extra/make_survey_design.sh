#!/usr/bin/env bash
# Regenerate tests/reference/extra/survey_design.json: mlsem's scores
# (make_survey_design.py) -> R's survey::svyrecvar (make_survey_design.R).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python "$here/make_survey_design.py" "$tmp"
Rscript "$here/make_survey_design.R" "$tmp" "$here/survey_design.json"
