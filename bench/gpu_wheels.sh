#!/usr/bin/env bash
# Fill .whl/ with the wheels that bench/gpu_check needs on the lent GPU machine and that its image
# lacks: open_clip_torch, webdataset and pydantic with their missing dependencies, at uv.lock's
# versions, for CPython 3.12 on manylinux x86_64. The image has torch, torchvision, timm, numpy,
# pandas, pyarrow, fsspec, regex, huggingface_hub, safetensors, tqdm, pyyaml, pillow, psutil,
# tensorboard and pytest (/work/.library/device/KINDS.md lists it); torch is never carried.
# Then every Requires-Dist of the carried wheels is checked: carried, in the image, or an error.
#
#   bench/gpu_wheels.sh                      # .whl/ for the device (Python 3.12)
#   PYVER=3.11 DEST=/tmp/whl311 bench/gpu_wheels.sh   # the same set for this machine's Python (dry runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
CARRY="open-clip-torch webdataset braceexpand ftfy wcwidth pydantic pydantic-core annotated-types typing-inspection
typing-extensions"
# What the device image already holds (names as pip normalises them), as far as the carried wheels need it.
IMAGE="torch torchvision timm numpy pandas pyarrow fsspec regex huggingface-hub safetensors tqdm pyyaml pillow psutil
tensorboard pytest packaging filelock"

version() {  # name -> version pinned in uv.lock
  awk -v n="$1" '$0 == "name = \"" n "\"" { getline; gsub(/version = |"/, ""); print; exit }' uv.lock
}

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two stop the install there
for name in $CARRY; do
  v=$(version "$name")
  [ -n "$v" ] || { echo "no version of $name in uv.lock" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$name==$v"
done

norm() { tr 'A-Z_.' 'a-z--'; }
known=" $(echo $CARRY $IMAGE | norm) "
status=0
for whl in "$DEST"/*.whl; do
  # Requires-Dist lines that apply without extras: the name before any version, marker or bracket.
  for dep in $(unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist:' | grep -v 'extra ==' |
               sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | norm); do
    case "$known" in
      *" $dep "*) ;;
      *) echo "$(basename "$whl") needs $dep: neither carried nor in the device image" >&2; status=1 ;;
    esac
  done
done
ls -l "$DEST"
du -sh "$DEST"
exit $status
