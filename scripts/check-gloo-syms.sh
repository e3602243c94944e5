#!/bin/sh
# Fails when an object or archive of the c10d shim defines anything that belongs to gloo itself:
# code, vtables or typeinfo of gloo:: classes, or c10d::ProcessGroupGloo::GlooStore. Those would
# be built from kernels/c10d/gloo_stub's declaration-only headers and could differ from the gloo
# compiled into libtorch_cpu. build.rs runs it on every build; `make test` on the built archives.
#   scripts/check-gloo-syms.sh [FILE...]   (no FILE: the archives under target/*/build)
set -eu
if [ $# -eq 0 ]; then
  set -- $(find target -path '*/out/dl_c10d*/libdl_c10d*.a' 2>/dev/null | sort)
  [ $# -gt 0 ] || { echo "check-gloo-syms: no c10d archive under target/ (build first)" >&2; exit 1; }
fi
command -v nm >/dev/null || { echo "check-gloo-syms: nm (binutils) is needed" >&2; exit 1; }
syms=$(nm -C --defined-only "$@") || { echo "check-gloo-syms: nm failed on $*" >&2; exit 1; }
bad=$(printf '%s\n' "$syms" | awk '{ $1 = ""; $2 = ""; print }' |
  grep -E '^ *(gloo::|vtable for gloo::|typeinfo( name)? for gloo::|.*GlooStore)' || true)
if [ -n "$bad" ]; then
  echo "check-gloo-syms: gloo-owned symbols defined in $*:"
  printf '%s\n' "$bad"
  exit 1
fi
echo "check-gloo-syms: no gloo-owned symbol in $# archives"
