#!/usr/bin/env bash
# Fills .whl/ with the wheels that bench/gpu/run.sh installs on a GPU machine without network, for the packages
# its image lacks (the lent H100/H200 image has torch, transformers, peft, accelerate, torchmetrics, pyparsing,
# regex and safetensors; see .library/device/KINDS.md). Run it here, where pip reaches the package index:
#
#   bash bench/gpu/wheels.sh            # then name ".whl" in the device call's carry
#
# The versions are this venv's (the ones the tests pass with); a package the venv lacks is refused, not guessed.
# The folder is gitignored, so a fresh checkout runs this once before its first GPU call.
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-.venv/bin/python}"
packages=(diffusers compel open_clip_torch ftfy wcwidth importlib_metadata)
test -x "$python" || { echo "wheels.sh: no $python; run 'make venv' first (or set PYTHON)" >&2; exit 2; }
pins=()
for name in "${packages[@]}"; do
  version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") ||
    { echo "wheels.sh: $name is not installed in $python; run 'make venv' first" >&2; exit 2; }
  pins+=("$name==$version")
done
rm -rf .whl.partial
mkdir -p .whl.partial
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do platforms+=(--platform "$p"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl.partial "${pins[@]}"
rm -rf .whl
mv .whl.partial .whl
ls -1 .whl
du -sh .whl
