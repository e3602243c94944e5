#!/usr/bin/env bash
# The GPU check (DESIGN.md section 8): build here, run on a GPU machine that has no Rust.
#
# usage:
#   scripts/gpu-check.sh build   On this machine (Rust, no GPU needed; `make gpu-check`). Builds
#                                the release test binaries (with --features gpu-tests) and the
#                                profile binary, strips and gzips them, and puts them with the
#                                test data and a run.sh into gpu-check-bundle/ (must stay under
#                                64 MiB).
#   scripts/gpu-check.sh run     On the GPU machine (python3 with torch 2.11, an NVIDIA GPU, no
#                                Rust), from a checkout that carries gpu-check-bundle/. Points
#                                LD_LIBRARY_PATH at that torch's lib folder, shows nvidia-smi,
#                                runs every test binary, then the profile (default arguments),
#                                and prints one summary table: pass/fail counts per test binary
#                                and the profile's CUDA rows. Exits non-zero when anything failed
#                                or when no GPU is found.
#   gpu-check-bundle/run.sh      The same as `run`, from the bundle alone.
#
# Environment for `run`:
#   PYTHON                     the python with torch (default: python3)
#   GPU_CHECK_BUNDLE           the bundle folder (default: the folder of run.sh, or
#                              gpu-check-bundle/ at the repository root)
#   GPU_CHECK_OUT              where the logs and the profile's JSON go (default: $OUT when
#                              set, else <bundle>/results)
#   GPU_CHECK_TEST_TIMEOUT     seconds per test binary (default 120)
#   GPU_CHECK_PROFILE_TIMEOUT  seconds for the profile (default 240)
#   GPU_CHECK_PROFILE_ARGS     extra profile arguments, e.g. "--quick" (default: none)
#   GPU_CHECK_ALLOW_NO_GPU=1   succeed without a GPU (the CPU parts only); for testing the script
#   GPU_CHECK_GPU_TESTS        the test-name filter that the GPU tests match, skipped when no GPU
#                              is found (default: gpu::, i.e. tests in a module named gpu)
#   GPU_CHECK_SANITIZER        compute-sanitizer to use (default: PATH, $CUDA_HOME/bin,
#                              /usr/local/cuda/bin, then torch's nvidia/*/ wheels, e.g. the
#                              nvidia-cuda-sanitizer-api wheel); "none" skips the sanitizer phase
#   GPU_CHECK_SANITIZER_TESTS  the GPU tests each sanitizer tool runs (default: one float32 and one
#                              half-precision variant of the CUDA matrix and the bad-label test)
#   GPU_CHECK_SANITIZER_TIMEOUT seconds per sanitizer tool (default 75)
#
# test-dist (tests/dist.rs) starts its ranks as child processes of its own binary, on 127.0.0.1;
# its GPU tests (module gpu) run NCCL with world size 1, reduce_mean of a device avg_factor under
# the sync-debug error mode, and Gloo with CUDA tensors.
#
# The test binaries read their case files from $TCH_DETLOSS_DATA (the bundle's data/ folder, a
# copy of tests/data), since the path compiled into them does not exist on the GPU machine.
set -euo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
BUNDLE_LIMIT=$((64 * 1024 * 1024))

die() {
  echo "gpu-check: error: $*" >&2
  exit 1
}

need() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' is required but not found on PATH"
  done
}

# ------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------

# Reads cargo's JSON messages on stdin; prints "NAME<TAB>PATH" for each executable to bundle.
# $1 = tests: the test harnesses (lib and integration tests); $1 = bench: the profile binary.
executables() {
  python3 -c '
import json, sys
mode = sys.argv[1]
seen = set()
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") != "compiler-artifact" or not exe or exe in seen:
        continue
    kind, name = m["target"]["kind"], m["target"]["name"]
    if mode == "tests" and name == "readme":
        continue  # checks the README against the source tree, which the bundle does not carry
    if mode == "tests" and m["profile"]["test"] and ("lib" in kind or "test" in kind):
        label = ("unit-" if "lib" in kind else "test-") + name
    elif mode == "bench" and "bench" in kind and name == "profile":
        label = "profile"
    else:
        continue
    seen.add(exe)
    print(label + "\t" + exe)
' "$1"
}

build() {
  need cargo python3 strip gzip git
  local root bundle
  root=$(cd "$(dirname "$SELF")/.." && pwd)
  bundle=$root/gpu-check-bundle
  cd "$root"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT # global: the trap runs after build() returns

  echo "gpu-check: building release test binaries (--features gpu-tests) and the profile" >&2
  # Diagnostics are rendered to stderr; stdout carries only the JSON messages.
  cargo test --release --no-run --features gpu-tests \
    --message-format=json-render-diagnostics >"$tmp/tests.json"
  # Same features as the tests, so the library is built once.
  cargo bench --bench profile --no-run --features gpu-tests \
    --message-format=json-render-diagnostics >"$tmp/bench.json"
  executables tests <"$tmp/tests.json" >"$tmp/list"
  executables bench <"$tmp/bench.json" >>"$tmp/list"
  grep -q '^profile	' "$tmp/list" || die "cargo did not report the profile executable"
  grep -qv '^profile	' "$tmp/list" || die "cargo reported no test executables"

  rm -rf "$bundle"
  mkdir -p "$bundle/bin" "$bundle/data"
  local label exe
  # Every binary embeds the same CUDA fatbin; stripped and gzipped they take about a third.
  while IFS=$'\t' read -r label exe; do
    cp "$exe" "$bundle/bin/$label"
    strip "$bundle/bin/$label"
    printf '  %-28s %9s bytes stripped\n' "$label" "$(wc -c <"$bundle/bin/$label")" >>"$tmp/sizes"
    gzip -9 -n "$bundle/bin/$label"
  done <"$tmp/list"
  cp -R tests/data/. "$bundle/data/"
  cp "$SELF" "$bundle/gpu-check.sh"
  cat >"$bundle/run.sh" <<'SH'
#!/usr/bin/env bash
# Runs the GPU check from this bundle: see gpu-check.sh in this folder for options.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GPU_CHECK_BUNDLE=${GPU_CHECK_BUNDLE:-$here} exec bash "$here/gpu-check.sh" run "$@"
SH
  chmod +x "$bundle/run.sh" "$bundle/gpu-check.sh"

  local libtorch
  libtorch=$(sed -n 's/^LIBTORCH *= *"\(.*\)"/\1/p' .cargo/config.toml 2>/dev/null || true)
  {
    echo "tch-detloss gpu-check bundle"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "libtorch: ${libtorch:-${LIBTORCH:-unknown}}"
    echo "binaries (in bin/ gzipped; run unpacks them):"
    cat "$tmp/sizes"
  } >"$bundle/MANIFEST"

  local size
  size=$(du -sb "$bundle" | cut -f1)
  cat "$bundle/MANIFEST"
  echo "gpu-check: bundle $bundle: $((size / 1024)) KiB (limit $((BUNDLE_LIMIT / 1024)) KiB)"
  [ "$size" -le "$BUNDLE_LIMIT" ] || die "the bundle is over 64 MiB"
}

# ------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------

# gunzip $1 to stdout (with python3 where gzip is missing).
unpack() {
  if command -v gzip >/dev/null 2>&1; then
    gzip -dc "$1"
  else
    python3 -c 'import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1]), sys.stdout.buffer)' "$1"
  fi
}

# Prints "passed failed ignored filtered" from a libtest log (summed over its "test result:"
# lines), or nothing when there is none.
libtest_counts() {
  python3 -c '
import re, sys
total = None
pattern = r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored; \d+ measured; (\d+) filtered out"
for line in open(sys.argv[1], errors="replace"):
    m = re.search(pattern, line)
    if m:
        counts = [int(g) for g in m.groups()]
        total = counts if total is None else [a + b for a, b in zip(total, counts)]
if total:
    print(*total)
' "$1"
}

# The profile's rows from its JSON: the CUDA rows, or the CPU rows when there are none.
# Exits 3 when there are no CUDA rows.
profile_rows() {
  python3 -c '
import json, sys
rows = json.load(open(sys.argv[1]))
cuda = [r for r in rows if r["device"].startswith("cuda")]
shown = cuda or rows
if not cuda:
    print("  (no CUDA rows: the CPU rows follow)")
fmt = "  {:<16} {:<7} {:<8} {:<14} {:<16} {:>9} {:>10} {:>8} {:>9} {:>6} {:>5}"
print(fmt.format("loss", "device", "dtype", "shape", "pass", "fused ms", "unfused ms",
                 "speedup", "max|diff|", "GB/s", "%copy"))
for r in shown:
    opt = lambda v: "-" if v is None else "%.0f" % v
    print(fmt.format(r["loss"], r["device"], r["dtype"], r["shape"], r["pass"],
                     "%.3f" % r["fused_ms"], "%.3f" % r["unfused_ms"],
                     "%.2fx" % r["speedup"], "%.1e" % r["max_abs_diff"],
                     opt(r.get("fused_gbps")), opt(r.get("fused_pct_of_copy"))))
sys.exit(0 if cuda else 3)
' "$1"
}

# compute-sanitizer: GPU_CHECK_SANITIZER, PATH, CUDA_HOME, /usr/local/cuda, then the wheels in
# torch's site-packages ($1). Prints nothing when there is none.
find_sanitizer() {
  local c
  if [ -n "${GPU_CHECK_SANITIZER:-}" ]; then
    [ "$GPU_CHECK_SANITIZER" = none ] || echo "$GPU_CHECK_SANITIZER"
    return
  fi
  for c in "$(command -v compute-sanitizer 2>/dev/null || true)" \
    "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -n "$c" ] && [ -x "$c" ] && echo "$c" && return
  done
  find "$1/nvidia" -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1
}

run() {
  need python3 timeout
  local py=${PYTHON:-python3}
  local bundle=${GPU_CHECK_BUNDLE:-}
  if [ -z "$bundle" ]; then
    if [ -f "$(dirname "$SELF")/MANIFEST" ]; then
      bundle=$(dirname "$SELF")
    else
      bundle=$(cd "$(dirname "$SELF")/.." && pwd)/gpu-check-bundle
    fi
  fi
  [ -f "$bundle/MANIFEST" ] || die "no bundle at $bundle: run 'scripts/gpu-check.sh build' first (on a machine with Rust)"
  bundle=$(cd "$bundle" && pwd)
  local out=${GPU_CHECK_OUT:-${OUT:-$bundle/results}}
  mkdir -p "$out"
  out=$(cd "$out" && pwd)

  # torch's libraries (the binaries' built-in RUNPATH names the build machine's folder).
  local torch_info torch_dir site lib ld=""
  torch_info=$("$py" -c 'import os, torch
print(os.path.dirname(torch.__file__))
print(torch.__version__, "CUDA", torch.version.cuda, "| cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())' 2>"$out/python.log") ||
    die "'$py' cannot import torch (see $out/python.log); set PYTHON to the python that has torch 2.11"
  torch_dir=$(sed -n 1p <<<"$torch_info")
  [ -d "$torch_dir/lib" ] || die "no lib folder in $torch_dir"
  site=$(dirname "$torch_dir")
  ld=$torch_dir/lib
  [ -d "$site/nvidia/cu13/lib" ] && ld=$ld:$site/nvidia/cu13/lib
  for lib in "$site"/nvidia/*/lib; do
    case "$lib" in "$site/nvidia/cu13/lib" | "$site/nvidia/*/lib") ;; *) ld=$ld:$lib ;; esac
  done
  export LD_LIBRARY_PATH=$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export TCH_DETLOSS_DATA=$bundle/data
  export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

  echo "== bundle: $bundle ($(sed -n 2p "$bundle/MANIFEST"))"
  echo "== torch: $torch_dir ($(sed -n 2p <<<"$torch_info"))"
  local gpu=0
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1; then
    [ -n "$(nvidia-smi -L 2>/dev/null)" ] && gpu=1
  else
    echo "(nvidia-smi is not installed or found no GPU)"
  fi
  [ "$gpu" = 1 ] || echo "== NO GPU FOUND: running the CPU parts only; the CUDA paths are NOT checked"

  local failed=0 summary="" bin name rc counts p f i s t_test=${GPU_CHECK_TEST_TIMEOUT:-120}
  # The binaries, unpacked into a temporary folder (not $out, whose files may be sent back).
  local gz bins
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT # global: the trap runs after run() returns
  bins=$tmp
  for gz in "$bundle"/bin/*.gz; do
    [ -f "$gz" ] || die "no binaries in $bundle/bin"
    unpack "$gz" >"$bins/$(basename "$gz" .gz)"
    chmod +x "$bins/$(basename "$gz" .gz)"
  done

  # Without a GPU the GPU tests (module `gpu`, built in by --features gpu-tests) cannot pass:
  # skip them, so that what is reported is the CPU tests.
  local skip=()
  [ "$gpu" = 1 ] || skip=(--skip "${GPU_CHECK_GPU_TESTS:-gpu::}")
  for bin in "$bins"/unit-* "$bins"/test-*; do
    [ -x "$bin" ] || continue
    name=$(basename "$bin")
    echo "== $name${skip[*]:+ (${skip[*]})}"
    rc=0
    timeout -k 10 "$t_test" "$bin" ${skip[@]+"${skip[@]}"} >"$out/$name.log" 2>&1 || rc=$?
    tail -n 3 "$out/$name.log"
    counts=$(libtest_counts "$out/$name.log")
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      summary+=$(printf '  %-28s TIMEOUT after %ss\n' "$name" "$t_test")$'\n'
      failed=1
    elif [ -z "$counts" ]; then
      summary+=$(printf '  %-28s CRASHED (exit %s), see %s\n' "$name" "$rc" "$out/$name.log")$'\n'
      failed=1
    else
      read -r p f i s <<<"$counts"
      summary+=$(printf '  %-28s %-4s %4s passed %4s failed %4s ignored %4s skipped\n' "$name" \
        "$([ "$rc" = 0 ] && [ "$f" = 0 ] && echo ok || echo FAIL)" "$p" "$f" "$i" "$s")$'\n'
      { [ "$rc" = 0 ] && [ "$f" = 0 ]; } || failed=1
    fi
  done

  # compute-sanitizer over our kernels only (kns=dl_), with torch's caching allocator off so that
  # memcheck sees each buffer's real bounds; each tool under its own time limit.
  local san_summary="" san tool t_san=${GPU_CHECK_SANITIZER_TIMEOUT:-75} fused_bin
  local san_tests=${GPU_CHECK_SANITIZER_TESTS:-"gpu::cuda_matches_unfused::name_01___focal__::kind_2_Kind__Float gpu::cuda_matches_unfused::name_14___ce_softmax_cw_ignore255_avgnonignore_lw2__::kind_3_Kind__Half gpu::cuda_matches_unfused::name_21___ghmc_bins30_mom0_75_dense__::kind_2_Kind__Float gpu::cuda_bad_labels_give_nan"}
  fused_bin=$bins/test-fused
  san=$(find_sanitizer "$site")
  if [ "$gpu" != 1 ]; then
    san_summary="  skipped: no GPU"
  elif [ -z "$san" ]; then
    san_summary="  skipped: compute-sanitizer not found (carry the nvidia-cuda-sanitizer-api wheel, or set GPU_CHECK_SANITIZER)"
  elif [ ! -x "$fused_bin" ]; then
    san_summary="  skipped: no test-fused binary in the bundle"
    failed=1
  else
    echo "== compute-sanitizer: $san"
    # The probe: one small test under memcheck; without an ERROR SUMMARY line the sanitizer did
    # not attach to the device (driver or permissions), and the tools are not run.
    rc=0
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 60 "$san" --tool memcheck --kernel-name kns=dl_ \
      "$fused_bin" --exact gpu::cuda_bad_labels_give_nan >"$out/sanitizer-probe.log" 2>&1 || rc=$?
    local tools="memcheck racecheck synccheck initcheck"
    if ! grep -q 'ERROR SUMMARY' "$out/sanitizer-probe.log"; then
      san_summary="  compute-sanitizer does not see the device (exit $rc), see $out/sanitizer-probe.log"$'\n'
      tools=""
    fi
    for tool in $tools; do
      rc=0
      # shellcheck disable=SC2086  # san_tests is a list of test names
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$t_san" "$san" --tool "$tool" \
        --kernel-name kns=dl_ --error-exitcode 99 --print-limit 20 \
        "$fused_bin" --exact $san_tests --test-threads 1 >"$out/sanitizer-$tool.log" 2>&1 || rc=$?
      local errs launched
      errs=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$out/sanitizer-$tool.log" | tail -n 1 | grep -o '[0-9]*' || true)
      launched=$(libtest_counts "$out/sanitizer-$tool.log")
      if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        san_summary+=$(printf '  %-10s TIMEOUT after %ss' "$tool" "$t_san")$'\n'
        failed=1
      elif [ "$rc" = 0 ] && [ "${errs:-x}" = 0 ] && [ -n "$launched" ]; then
        san_summary+=$(printf '  %-10s ok   0 errors (%s)' "$tool" "$(sed 's/^\([0-9]*\) \([0-9]*\).*/\1 passed, \2 failed/' <<<"$launched")")$'\n'
      else
        san_summary+=$(printf '  %-10s FAIL exit %s, %s errors, see %s' "$tool" "$rc" "${errs:-?}" "$out/sanitizer-$tool.log")$'\n'
        failed=1
      fi
    done
  fi

  local t_prof=${GPU_CHECK_PROFILE_TIMEOUT:-240} prof_rows="" prof_status
  echo "== profile"
  rc=0
  # shellcheck disable=SC2086  # GPU_CHECK_PROFILE_ARGS is a list of words
  timeout -k 10 "$t_prof" "$bins/profile" --json "$out/profile.json" \
    ${GPU_CHECK_PROFILE_ARGS:-} 2>&1 | tee "$out/profile.log" || rc=$? # pipefail: the profile's status
  if [ "$rc" != 0 ]; then
    prof_status="FAILED (exit $rc), see $out/profile.log"
    [ "$rc" = 124 ] && prof_status="TIMEOUT after ${t_prof}s, see $out/profile.log"
    failed=1
  else
    rc=0
    prof_rows=$(profile_rows "$out/profile.json") || rc=$?
    if [ "$rc" = 0 ]; then
      prof_status=ok
    elif [ "$rc" = 3 ]; then
      prof_status="no CUDA rows"
      [ "$gpu" = 1 ] && prof_status+=" although nvidia-smi sees a GPU (libtorch_cuda not loaded, or no CUDA kernels in this build?)" && failed=1
    else
      prof_status="unreadable report $out/profile.json"
      failed=1
    fi
  fi

  echo
  echo "================ gpu-check summary ================"
  echo "GPU: $([ "$gpu" = 1 ] && nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 || echo 'NONE FOUND (CPU parts only)')"
  echo "tests:$([ "$gpu" = 1 ] || echo " (GPU tests skipped: ${skip[*]})")"
  printf '%s' "${summary:-  (no test binaries in the bundle)
}"
  echo "compute-sanitizer (kernels dl_*, caching allocator off):"
  printf '%s\n' "${san_summary%$'\n'}"
  echo "profile: $prof_status"
  [ -n "$prof_rows" ] && echo "$prof_rows"
  echo "logs: $out"
  if [ "$gpu" != 1 ] && [ "${GPU_CHECK_ALLOW_NO_GPU:-0}" != 1 ]; then
    echo "RESULT: FAIL (no GPU found; set GPU_CHECK_ALLOW_NO_GPU=1 to accept a CPU-only run)"
    exit 2
  fi
  if [ "$failed" != 0 ]; then
    echo "RESULT: FAIL"
    exit 1
  fi
  echo "RESULT: ok"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//' ;;
  *)
    echo "usage: $0 build|run   (see the header of $SELF)" >&2
    exit 2
    ;;
esac
