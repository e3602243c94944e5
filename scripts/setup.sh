#!/usr/bin/env bash
# Idempotent set-up: a Python environment with libtorch (torch==2.11.0, the version tch 0.24
# expects) and nvcc from PyPI, kept in a per-user cache folder named after its versions so that
# every clone (CI's included) reuses it, plus .cargo/config.toml pointing cargo at it.
set -euo pipefail

TORCH_VERSION=2.11.0
NVCC_VERSION=13.0.88
CCCL_VERSION=13.0.85
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${TCH_DETLOSS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tch-detloss}
VENV=$CACHE/torch-$TORCH_VERSION-nvcc-$NVCC_VERSION
PY=${PYTHON:-python3}

if [ ! -f "$VENV/.complete" ]; then
  echo "setup: creating $VENV (torch $TORCH_VERSION, nvcc $NVCC_VERSION; about 5 GB)" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q \
    "torch==$TORCH_VERSION" \
    "nvidia-cuda-nvcc==$NVCC_VERSION" "nvidia-cuda-crt==$NVCC_VERSION" \
    "nvidia-nvvm==$NVCC_VERSION" "nvidia-cuda-cccl==$CCCL_VERSION"
  touch "$VENV/.complete"
fi

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LIBTORCH=$SITE/torch
NVCC=$SITE/nvidia/cu13/bin/nvcc
[ -x "$NVCC" ] || NVCC=$(ls "$SITE"/nvidia/*/bin/nvcc 2>/dev/null | head -n 1 || true)

mkdir -p "$ROOT/.cargo"
CONFIG="$ROOT/.cargo/config.toml"
NEW=$(cat <<TOML
# Written by scripts/setup.sh; do not edit by hand.
[env]
LIBTORCH = "$LIBTORCH"
TCH_DETLOSS_NVCC = "$NVCC"

# Doctests get no link arguments from build.rs: give them the rpath to libtorch here.
[build]
rustdocflags = ["-C", "link-arg=-Wl,-rpath,$LIBTORCH/lib"]
TOML
)
if [ ! -f "$CONFIG" ] || [ "$(cat "$CONFIG")" != "$NEW" ]; then
  printf '%s\n' "$NEW" >"$CONFIG"
  echo "setup: wrote $CONFIG" >&2
fi

# The Python environment at a fixed place, for torchrun (`make train-dist`, the README).
if [ "$(readlink "$ROOT/.venv" 2>/dev/null)" != "$VENV" ]; then
  ln -sfn "$VENV" "$ROOT/.venv"
  echo "setup: linked $ROOT/.venv -> $VENV" >&2
fi
