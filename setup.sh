#!/usr/bin/env bash
# One-command setup: creates .venv/ in the repository root and installs the runtime and test
# dependencies. A second run with unchanged requirement files only checks the stamp and exits.
#   bash setup.sh                  # .venv/ with runtime + test dependencies
#   SVPR_NO_DEV=1 bash setup.sh    # runtime dependencies only
#   SVPR_NO_VENV=1 bash setup.sh   # install into the active environment (conda, existing venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

FASTREID_SPEC="fastreid==1.4.0"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: setup.sh needs Python 3.10 or newer as '$PYTHON' (set PYTHON=/path/to/python3.x)" >&2
    exit 2
fi

if [[ "${SVPR_NO_VENV:-0}" == "1" ]]; then
    PY="$PYTHON"
    STAMP_DIR="$("$PY" -c 'import sys; print(sys.prefix)')"
else
    if [[ ! -x .venv/bin/python ]]; then
        echo "setup: creating .venv/"
        "$PYTHON" -m venv .venv
    fi
    PY=".venv/bin/python"
    STAMP_DIR=".venv"
fi

WANT_DEV=1
[[ "${SVPR_NO_DEV:-0}" == "1" ]] && WANT_DEV=0
FILES=(requirements.txt constraints.txt)
[[ $WANT_DEV == 1 ]] && FILES+=(requirements-dev.txt)
STAMP="$STAMP_DIR/.svpr-setup-stamp"
DIGEST="$( (cat "${FILES[@]}"; echo "dev=$WANT_DEV $FASTREID_SPEC"; "$PY" -V) | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$DIGEST" ]] \
   && (cd / && "$PY" -c 'import torch, torchvision, timm, yacs, ftfy, regex, numpy, PIL, tqdm, configs') 2>/dev/null; then
    echo "setup: up to date ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
    exit 0
fi

"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet -r requirements.txt -c constraints.txt
# The repository itself, editable: its packages import from any folder (tools/, notebooks, ...).
"$PY" -m pip install --quiet --no-deps --config-settings editable_mode=compat -e .
if [[ $WANT_DEV == 1 ]]; then
    "$PY" -m pip install --quiet -r requirements-dev.txt -c constraints.txt
    "$PY" -m pip install --quiet --no-deps "$FASTREID_SPEC"
fi
echo "$DIGEST" > "$STAMP"
echo "setup: done ($("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
