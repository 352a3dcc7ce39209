#!/usr/bin/env bash
# A separate virtual environment with NVIDIA NeMo for the nemo backend's job side and its tests
# (NeMo pins omegaconf, numpy and transformers versions the main venv must not take).
#
#   bash scripts/nemo_venv.sh [DIR]      (default: .nemo-venv; reused when its pins already match)
#
# The project itself is not installed there: run with PYTHONPATH=<checkout> (the tests do), so one venv
# serves every checkout (.ci/run keeps it in ~/.cache/moe-launch between runs).
#
# Pins measured to install together on Python 3.11 (../shared/reference/dependencies.md): the CPU torch
# wheel of the main venv, nemo-toolkit[llm] 2.7.3, nemo-run 0.11.1 (leptonai 0.27.3 pinned: newer breaks it;
# pyarrow < 26: 26 needs numpy 2, NeMo pins numpy 1.26).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.nemo-venv}"
PINS="torch==2.13.0 nemo-toolkit[llm]==2.7.3 nemo-run==0.11.1 leptonai==0.27.3 pyarrow<26"
if [[ -x "$DIR/bin/python" && "$(cat "$DIR/.pins" 2>/dev/null)" == "$PINS" ]]; then
  echo "[nemo_venv] $DIR is up to date"
  exit 0
fi
rm -rf "$DIR"
python3 -m venv "$DIR"
# shellcheck disable=SC2086
"$DIR/bin/pip" install -q $PINS
echo "$PINS" > "$DIR/.pins"
echo "[nemo_venv] ready: $DIR/bin/python ($("$DIR/bin/python" -c 'import nemo, nemo_run; print("nemo", nemo.__version__, "nemo_run", nemo_run.__version__)'))"
