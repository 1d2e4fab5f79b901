#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a GPU machine without internet that has Python 3.12, torch,
# transformers, peft and accelerate, sent in transfers of at most 64 MiB: run here, then carry .whl/a in one
# call and .whl/b in the next (docs/benchmarks.md says how). Versions: requirements.lock's.
# Ray's wheel (79 MB) is split across the two; bitsandbytes keeps its CUDA 13 kernels only (43 MB -> 5 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
NAMES="ray bitsandbytes transformers peft optuna datasets evaluate tensorboardX alembic SQLAlchemy colorlog Mako
pydantic pydantic_core annotated-types typing-inspection dill multiprocess jsonschema jsonschema-specifications
referencing rpds-py httpx2 httpcore2 truststore"
pins=$(for name in $NAMES; do
  grep -i "^$name==" requirements.lock || { echo "error: $name is not in requirements.lock" >&2; exit 1; }
done)
platforms=$(for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  echo "--platform ${tag}_x86_64"; done)
rm -rf .whl && mkdir -p .whl/all .whl/a .whl/b
# shellcheck disable=SC2086
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms -d .whl/all $pins
.venv/bin/python - <<'EOF'
import glob, re, zipfile
source = glob.glob(".whl/all/bitsandbytes-*.whl")[0]
other = re.compile(r"libbitsandbytes_(cuda1[12]\d|rocm|xpu)")  # CUDA 11-12, ROCm, XPU: CUDA 13's and the CPU's stay
target = source.replace("/all/", "/b/")
with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as kept:
    for item in wheel.infolist():
        data = wheel.read(item.filename)
        if item.filename.endswith("RECORD"):
            data = "".join(line for line in data.decode().splitlines(True) if not other.search(line)).encode()
        if not other.search(item.filename):
            kept.writestr(item, data)
EOF
basename .whl/all/ray-*.whl >.whl/a/ray.name  # pip reads a wheel's tags from its name
split -b 40000000 .whl/all/ray-*.whl .whl/a/ray.part-
mv .whl/a/ray.part-ab .whl/b/
mv .whl/all/transformers-*.whl .whl/all/peft-*.whl .whl/a/
rm .whl/all/ray-*.whl .whl/all/bitsandbytes-*.whl
mv .whl/all/*.whl .whl/b/ && rmdir .whl/all
du -sh .whl/a .whl/b
