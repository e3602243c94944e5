// The emulated CUDA device: kernels/kernels.cu, unchanged, compiled with the host C++ compiler
// through cuda_shim.h, its __global__ entry points run on fibers (fiber.cpp), behind the C API of
// emu_api.h. The one translation unit to build:
//
//   g++ -std=c++17 -O2 -I<CUDA include folder with cuda_fp16.h> -c kernels/emu/device.cpp
//
// (-pthread when linking). Nothing here names a kernel: each entry point registers itself
// through the DL_REGISTER_ENTRY hook that kernels.cu expands after its definition.
#define DL_EMU_DEVICE_TU 1

#include "fiber.cpp"  // the scheduler and registry (no CUDA in it)

#include "cuda_shim.h"

#include "../kernels.cu"

#include <cstddef>
#include <exception>
#include <new>
#include <string>

namespace {
void write_err(char* err, size_t errlen, const char* msg) {
  if (!err || errlen == 0) return;
  size_t n = strlen(msg);
  if (n >= errlen) n = errlen - 1;
  memcpy(err, msg, n);
  err[n] = '\0';
}
}  // namespace

extern "C" int dl_emu_launch(const char* name, uint32_t grid, uint32_t block, const void* args, size_t args_size,
                             int32_t flags, char* err, size_t errlen) {
  try {
    std::string msg;
    const int rc = dl_emu::launch(name, grid, block, args, args_size, flags, msg);
    if (rc != 0) write_err(err, errlen, msg.c_str());
    else if (err && errlen)
      err[0] = '\0';
    return rc;
  } catch (const std::bad_alloc&) {
    write_err(err, errlen, "out of memory in the emulated device");
    return 3;
  } catch (const std::exception& e) {
    write_err(err, errlen, e.what());
    return 3;
  } catch (...) {
    write_err(err, errlen, "unknown C++ exception in the emulated device");
    return 3;
  }
}

// The argument block as this compiler lays out kernels/common.cuh (the header nvcc compiles too):
// src/fused.rs checks DlArgs against it field by field.
#define DL_ARGS_ROW_(T, name) {#name, offsetof(dl::Args, name), sizeof(T)},
static const dl::ArgsField dl_args_layout_rows[] = {DL_ARGS_FIELDS(DL_ARGS_ROW_)};
#undef DL_ARGS_ROW_

extern "C" size_t dl_args_layout(const dl::ArgsField** rows) {
  *rows = dl_args_layout_rows;
  return sizeof(dl_args_layout_rows) / sizeof(dl_args_layout_rows[0]);
}

extern "C" size_t dl_emu_kernel_count(void) { return dl_emu::entry_count(); }

extern "C" const char* dl_emu_kernel_name(size_t i) {
  const dl_emu::Entry* e = dl_emu::entry_at(i);
  return e ? e->name : nullptr;
}
