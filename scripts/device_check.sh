#!/usr/bin/env bash
# The prepared GPU check (scripts/device_check.py): throughput, memory, precision, end to end.
#
#   bash scripts/device_check.sh --out device_results     # on a GPU machine, about 8 minutes
#   bash scripts/device_check.sh --smoke --out /tmp/dc    # tiny settings, to test it on a CPU
#
# Runs from a plain checkout with no install step. Where hydra-core/omegaconf/antlr4 are not
# importable (a GPU machine's own Python), they are installed from the wheels in
# $METALAB_DEVICE_CARRY/wheels (default device_carry/, which `make device-carry` fills, with
# the Omniglot archives in device_carry/data/). METALAB_DATA_DIR defaults to that data folder.
set -euo pipefail
cd "$(dirname "$0")/.."
carry="${METALAB_DEVICE_CARRY:-device_carry}"
python="${PYTHON:-python3}"
if ! "$python" -c "import hydra, omegaconf" 2>/dev/null; then
  [ -d "$carry/wheels" ] || { echo "device_check: hydra-core is not importable and $carry/wheels is missing; run make device-carry first" >&2; exit 2; }
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/metalab-site "$carry"/wheels/*.whl
  export PYTHONPATH="/tmp/metalab-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${METALAB_DATA_DIR:-}" ] && [ -d "$carry/data" ]; then export METALAB_DATA_DIR="$PWD/$carry/data"; fi
exec "$python" scripts/device_check.py "$@"
