#!/usr/bin/env bash
# Wheels of the packages a lent GPU machine lacks (zarr and its needs; it reaches no package index), for its Python,
# into .whl/ (git-ignored, travels with the working tree; scripts/gpu_check.sh installs them with --no-deps into
# /tmp/site). numpy is left out on purpose: the machine's own numpy, which its torch was built against, stays.
#
#   bash scripts/gpu_wheels.sh            (PYV=3.12: the device machines' Python in sessions 9-13)
set -eu
PYV=${PYV:-3.12}
PY=${PY:-.venv/bin/python}
ZARR=$($PY -c 'import zarr; print(zarr.__version__)')
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "zarr==$ZARR" numcodecs donfig google-crc32c pyyaml
ls .whl
