#!/usr/bin/env bash
# Builds the emulated CUDA device (kernels/emu/device.cpp, which compiles kernels/kernels.cu with
# the host compiler) together with its self-test (kernels/emu/selftest.cpp) and runs the self-test.
# No GPU, no torch, no cargo.
#
# usage: scripts/emu-sanitize.sh [MODE] [selftest arguments...]
#   asan      (default) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all; the fibers
#             switch with swapcontext (the default under AddressSanitizer)
#   asan-asm  the same with -DDL_EMU_ASAN_ASM: the assembly switch with AddressSanitizer's fiber
#             annotations (about 8x faster than asan)
#   plain     -O2, the x86-64 assembly context switch; also runs the launch benchmark
#   check     the plain build and self-test without the benchmark (part of `make test`)
#   ucontext  -O2 with -DDL_EMU_UCONTEXT (the portable swapcontext fallback); also the benchmark
#   bench     the plain and ucontext builds, benchmark only
# Exits non-zero when a build or a check fails.
#
# Environment:
#   CUDA_INCLUDE   the folder with cuda_fp16.h / cuda_bf16.h (default: next to TCH_DETLOSS_NVCC,
#                  read from the environment or .cargo/config.toml, which scripts/setup.sh writes)
#   CXX            the compiler (default g++)
#   EMU_BUILD_DIR  where the objects go (default target/emu-selftest)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:-asan}
[ $# -gt 0 ] && shift
CXX=${CXX:-g++}
BUILD=${EMU_BUILD_DIR:-$ROOT/target/emu-selftest}

find_include() {
  if [ -n "${CUDA_INCLUDE:-}" ]; then
    echo "$CUDA_INCLUDE"
    return
  fi
  local nvcc=${TCH_DETLOSS_NVCC:-}
  if [ -z "$nvcc" ] && [ -f "$ROOT/.cargo/config.toml" ]; then
    nvcc=$(sed -n 's/^[[:space:]]*TCH_DETLOSS_NVCC[[:space:]]*=[[:space:]]*"\(.*\)"[[:space:]]*$/\1/p' "$ROOT/.cargo/config.toml" | head -n 1)
  fi
  if [ -n "$nvcc" ]; then
    echo "$(dirname "$(dirname "$nvcc")")/include"
    return
  fi
  # No configuration yet: the cache folder that scripts/setup.sh fills.
  local cache=${TCH_DETLOSS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tch-detloss}
  ls -d "$cache"/*/lib/python*/site-packages/nvidia/cu*/include 2>/dev/null | head -n 1
}

INC=$(find_include)
if [ -z "$INC" ] || [ ! -f "$INC/cuda_fp16.h" ] || [ ! -f "$INC/cuda_bf16.h" ]; then
  echo "emu-sanitize: no cuda_fp16.h / cuda_bf16.h found (looked in '${INC}'); run scripts/setup.sh or set CUDA_INCLUDE" >&2
  exit 2
fi

# dl_bodies.inc, as build.rs writes it: one #include per kernel body of kernels/losses.def.
GEN=$BUILD/gen
mkdir -p "$GEN"
{
  echo "#pragma once"
  sed -n 's|^[[:space:]]*X(\([a-z0-9_]*\),.*|#include "'"$ROOT"'/kernels/\1.cuh"|p' "$ROOT/kernels/losses.def"
} >"$GEN/dl_bodies.inc.tmp"
cmp -s "$GEN/dl_bodies.inc.tmp" "$GEN/dl_bodies.inc" 2>/dev/null || mv "$GEN/dl_bodies.inc.tmp" "$GEN/dl_bodies.inc"
rm -f "$GEN/dl_bodies.inc.tmp"

COMMON=(-std=c++17 -I"$INC" -I"$GEN" -Wall -Wextra -pthread)

# build NAME FLAGS...: compiles device.cpp and selftest.cpp (in parallel) and links $BUILD/NAME/selftest.
build() {
  local name=$1
  shift
  local dir=$BUILD/$name
  mkdir -p "$dir"
  echo "emu-sanitize: building $name ($*)" >&2
  "$CXX" "${COMMON[@]}" "$@" -c "$ROOT/kernels/emu/device.cpp" -o "$dir/device.o" &
  local p1=$!
  "$CXX" "${COMMON[@]}" "$@" -c "$ROOT/kernels/emu/selftest.cpp" -o "$dir/selftest.o" &
  local p2=$!
  local rc=0
  wait $p1 || rc=1
  wait $p2 || rc=1
  [ $rc -eq 0 ] || { echo "emu-sanitize: $name build failed" >&2; return 1; }
  "$CXX" "${COMMON[@]}" "$@" "$dir/device.o" "$dir/selftest.o" -o "$dir/selftest"
}

# run NAME ARGS...: runs the self-test; fails unless it exits 0 and reports 0 failures.
run() {
  local name=$1
  shift
  local log=$BUILD/$name/selftest.log
  local rc=0
  "$BUILD/$name/selftest" "$@" 2>&1 | tee "$log" || rc=$?
  if [ $rc -ne 0 ] || ! grep -q '^selftest: [0-9]* passed, 0 failed$' "$log"; then
    echo "emu-sanitize: $name self-test FAILED (exit $rc; log: $log)" >&2
    return 1
  fi
  echo "emu-sanitize: $name self-test passed" >&2
}

bench() {
  "$BUILD/$1/selftest" --bench "${BENCH_ITERS:-50}"
}

SAN=(-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1:check_initialization_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

case "$MODE" in
  asan)
    build asan "${SAN[@]}"
    run asan "$@"
    ;;
  asan-asm)
    build asan-asm "${SAN[@]}" -DDL_EMU_ASAN_ASM
    run asan-asm "$@"
    ;;
  plain)
    build plain -O2
    run plain "$@"
    bench plain
    ;;
  check)
    build plain -O2
    run plain "$@"
    ;;
  ucontext)
    build ucontext -O2 -DDL_EMU_UCONTEXT
    run ucontext "$@"
    bench ucontext
    ;;
  bench)
    build plain -O2
    build ucontext -O2 -DDL_EMU_UCONTEXT
    bench plain
    bench ucontext
    ;;
  *)
    echo "usage: $0 [asan|asan-asm|plain|check|ucontext|bench] [selftest arguments...]" >&2
    exit 2
    ;;
esac
