#!/usr/bin/env bash
# The packages a GPU window needs beyond the device image's own (torch, pytorch-lightning, pandas, matplotlib,
# pytest are there), as wheels for its Python 3.12 on x86-64, into .whl/ (git-ignored; the device run carries it).
#   bash bench/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two of one package stop the whole install there
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# src.train: hydra-core, omegaconf; bench_stn.py: kornia (+ its compiled kornia_rs)
python -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl "hydra-core==1.3.*" "omegaconf==2.3.*" "kornia==0.9.*" \
  "kornia_rs==0.2.*"
# hydra's parser runtime is published as a source archive only; it is pure Python, so the wheel built here runs there
python -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
du -sh .whl
