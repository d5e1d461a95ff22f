#!/usr/bin/env bash
# Build the peer stacks' packages for the GPU machine (no network there) as one archive: .peers/peers.tar.xz.
#
# Only what the device image lacks (see /work/.library/device/KINDS.md: torch, transformers 5.17, peft,
# accelerate, triton, pyarrow, pandas, xxhash, ... are there), read off each wheel's Requires-Dist:
#   unsloth/  unsloth + unsloth_zoo (Unsloth's process only), trl 1.15 + datasets 4.8 (their pins) + dill +
#             multiprocess, and the small modules Unsloth imports lazily on the training path (tyro and its
#             needs, cut_cross_entropy, msgspec, json5, nest_asyncio, structlog). Not carried: xformers
#             (no cu130 wheel; Unsloth falls back to SDPA), torchao (QAT only), hf_transfer, diffusers,
#             vllm (not on these code paths).
#   liger/    liger-kernel (needs only torch and triton).
# bitsandbytes (CUDA 13 library only) travels in .whl/ with tuneloop's own wheels.
# Stripped: unsloth/studio... the web UI, 82 MB), unsloth_cli, caches, tests. unsloth_zoo keeps mlx/ (its
# import needs it). Run anywhere; .peers/ then holds only the archive (~5 MB), carried as `.peers`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.peers/' .git/info/exclude || echo '/.peers/' >> .git/info/exclude
WORK=${TMPDIR:-/tmp}/tuneloop-peers   # wheels and the unpacked tree stay outside the repository
DL=$WORK/wheels
BUILD=$WORK/build
rm -rf "$BUILD" && mkdir -p "$DL" "$BUILD/unsloth" "$BUILD/liger"
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d "$DL" "$@"; }
UNSLOTH_SET=("unsloth==2026.10.9" "unsloth_zoo==2026.10.9" "trl==1.15.0" "datasets==4.8.5" "dill==0.4.1"
  "multiprocess==0.70.19" "tyro==1.0.17" "docstring-parser==0.18.0" "typeguard==4.6.1" "shtab==1.13.0"
  "cut_cross_entropy==25.1.1" "msgspec==0.22.0" "json5==0.17.3" "nest-asyncio==1.6.0" "structlog==26.1.0")
LIGER_SET=("liger-kernel==0.8.5")
for spec in "${UNSLOTH_SET[@]}" "${LIGER_SET[@]}"; do get "$spec"; done
wheel_of() { local name=${1%%==*}; ls "$DL"/$(echo "$name" | tr '-' '_')-${1##*==}-*.whl 2>/dev/null || ls "$DL"/"$name"-${1##*==}-*.whl; }
for spec in "${UNSLOTH_SET[@]}"; do unzip -q -o "$(wheel_of "$spec")" -d "$BUILD/unsloth"; done
for spec in "${LIGER_SET[@]}"; do unzip -q -o "$(wheel_of "$spec")" -d "$BUILD/liger"; done
rm -rf "$BUILD/unsloth/studio" "$BUILD/unsloth/unsloth_cli"
find "$BUILD" -depth \( -name __pycache__ -o -name tests -o -name '*.pyc' \) -exec rm -rf {} +
find "$BUILD" -path '*.dist-info/RECORD' -delete
tar -C "$BUILD" -cJf .peers/peers.tar.xz unsloth liger
du -sh "$BUILD"/* .peers/peers.tar.xz
