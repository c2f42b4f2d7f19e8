#!/bin/sh
# `make gpu-check` on a GPU machine: needs no network and no .venv. Python packages the machine
# lacks travel as wheels in .whl/ (`make gpu-wheels` fetches them here) and are installed into
# /tmp/gie-site first; the repository itself is put on PYTHONPATH. Results: $OUT/gpu_check.json
# (or out/gpu-check/). Extra arguments go to python -m engine.backends.cuda.gpu_check.
set -e
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gie-site .whl/*.whl
    PYTHONPATH="/tmp/gie-site${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH PYTHONUNBUFFERED=1
exec "$PY" -m engine.backends.cuda.gpu_check --out "${OUT:-out/gpu-check}" "$@"
