#!/usr/bin/env bash
# Download the wheels a lent GPU machine lacks for convzoo-gpu-check (scripts/gpu-wheels.txt: one pinned version
# each, Python 3.12, manylinux x86-64, no dependencies resolved) into wheels-gpu/ (ignored by git), or into the
# folder given as the first argument. Run it on a machine with PyPI; the GPU machine reaches nothing. The
# README's "On a new GPU" gives the command line that installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-wheels-gpu}
pins=scripts/gpu-wheels.txt
mkdir -p "$dest"
rm -f "$dest"/*.whl  # exactly the pinned set: no wheel of an earlier pin left beside it
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$dest" --requirement "$pins"
want=$(grep -c '^[^#].*==' "$pins")
got=$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$want" != "$got" ]; then
    echo "download_gpu_wheels: $got wheels in $dest for $want pins in $pins" >&2
    exit 1
fi
echo "$got wheels in $dest ($(du -sh "$dest" | cut -f1)):"
ls "$dest"
