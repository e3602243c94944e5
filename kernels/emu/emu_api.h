/* The C API of the emulated CUDA device (kernels/emu/device.cpp): runs the __global__ entry points
 * of kernels/kernels.cu on the CPU, one CUDA thread per fiber. Plain C, for the Rust side. */
#ifndef DL_EMU_API_H
#define DL_EMU_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Runs kernel `name` with `grid` blocks of `block` threads (block a multiple of 32, <= 1024; grid
 * >= 1), passing a copy of the `args_size` bytes at `args`, which must equal the size of the
 * kernel's parameters (one struct parameter: its sizeof; several: laid out as a C struct of them in
 * order).
 * flags: bit 0 = run the threads of each block in reverse order; other bits must be 0.
 * Returns 0; 1 = no such kernel; 2 = synchronization error or trap; 3 = bad launch (size
 * mismatch, bad block or grid size, flags, a launch from inside a kernel, out of memory).
 * On non-zero a NUL-terminated message is written to err (errlen bytes; err may be NULL).
 * Blocks run one after another on the calling OS thread; any number of OS threads may launch
 * concurrently (all scheduler state is thread-local). Never throws. */
int dl_emu_launch(const char* name, uint32_t grid, uint32_t block, const void* args, size_t args_size,
                  int32_t flags, char* err, size_t errlen);

/* The registered entry points, in registration order (kernels.cu's order, then any others). */
size_t dl_emu_kernel_count(void);
const char* dl_emu_kernel_name(size_t i); /* NULL when i >= dl_emu_kernel_count() */

#ifdef __cplusplus
}
#endif

#endif /* DL_EMU_API_H */
