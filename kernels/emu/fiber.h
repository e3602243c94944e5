// The fiber scheduler of the emulated CUDA device: what the CUDA shim (cuda_shim.h) and the entry
// point registry need to see. The implementation is fiber.cpp, compiled as part of device.cpp.
//
// Model: a launch runs its blocks one after another on the calling OS thread; each CUDA thread of
// a block is a fiber with its own stack. A fiber runs until it reaches a barrier (__syncthreads:
// its block; a warp shuffle, vote or __syncwarp: the lanes of its mask) or returns. A barrier
// releases when every thread of its scope has arrived at the same kind of barrier (and, for warp
// operations, with the same mask); the warp operations are computed for all lanes at the release.
// When no fiber can run while some still wait, the launch fails with a message that says who
// waits where. All state is thread-local: OS threads launch independently.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "emu_api.h"

namespace dl_emu {

// Barrier kinds. The block-scope ones first.
enum Kind : uint8_t {
  K_NONE = 0,
  K_SYNCTHREADS,
  K_SYNCTHREADS_COUNT,
  K_SYNCTHREADS_AND,
  K_SYNCTHREADS_OR,
  K_LAST_BLOCK_KIND = K_SYNCTHREADS_OR,
  // warp scope (the lanes named by the mask)
  K_SHFL,
  K_SHFL_UP,
  K_SHFL_DOWN,
  K_SHFL_XOR,
  K_BALLOT,
  K_ANY,
  K_ALL,
  K_SYNCWARP,
  K_MATCH_ANY,
  K_MATCH_ALL,
  K_REDUCE_ADD,
  K_REDUCE_MIN,
  K_REDUCE_MAX,
  K_REDUCE_AND,
  K_REDUCE_OR,
  K_REDUCE_XOR,
  K_COUNT
};
const char* kind_name(Kind k);

// What kernel code reads for threadIdx.x, blockIdx.x, blockDim.x and gridDim.x (the launches are
// one-dimensional). `tid` follows the running fiber.
struct View {
  uint32_t tid, block_idx, block_dim, grid_dim;
};
extern __thread View tls_view;

// Block barrier; for the _count/_and/_or kinds `pred` is this thread's predicate and the result
// is the block's count / and / or. Aborts the launch (never returns) on a misuse.
int block_barrier(Kind k, int pred);
// Warp operation on the lanes of `mask` (the calling lane must be in it). `value`: the lane's
// operand bits (shuffles, match) or predicate (votes); `param`: srcLane / delta / laneMask, or for
// __reduce_*: 1 when the operands are signed; `width`: the shuffle width. Returns the lane's
// result bits.
uint64_t warp_op(Kind k, uint32_t mask, uint64_t value, int32_t param, int32_t width);
// Ends the launch with an error (rc 2) naming `what`, the block and the thread. Never returns.
[[noreturn]] void trap(const char* what);
// Lets the other ready threads of the block run first (__nanosleep: spin-waits make progress).
void yield();

// ---- entry point registry ----

using AnyFn = void (*)();
struct Entry {
  const char* name;
  AnyFn fn;
  void (*invoke)(AnyFn fn, const unsigned char* args);  // copies the parameters, calls fn
  size_t args_size;
  uint32_t max_threads;  // the kernel's __launch_bounds__ when registered with it, else 1024
};
void register_entry(const Entry& e);
size_t entry_count();
const Entry* entry_at(size_t i);
const Entry* find_entry(const char* name);

// The parameter buffer of a kernel with parameters Ps...: laid out as a C struct of them.
template <class... Ps> struct Layout {
  static constexpr size_t n = sizeof...(Ps);
  static constexpr size_t sizes[n + 1] = {sizeof(Ps)..., 0};
  static constexpr size_t aligns[n + 1] = {alignof(Ps)..., 1};
  static constexpr size_t offset(size_t i) {
    size_t off = 0;
    for (size_t k = 0; k < n; ++k) {
      off = (off + aligns[k] - 1) / aligns[k] * aligns[k];
      if (k == i) return off;
      off += sizes[k];
    }
    return off;
  }
  static constexpr size_t total() {
    size_t off = 0, al = 1;
    for (size_t k = 0; k < n; ++k) {
      off = (off + aligns[k] - 1) / aligns[k] * aligns[k] + sizes[k];
      if (aligns[k] > al) al = aligns[k];
    }
    return (off + al - 1) / al * al;
  }
};

template <class P> inline P load_param(const unsigned char* p) {
  P v;
  memcpy(static_cast<void*>(&v), p, sizeof(P));
  return v;
}

template <class... Ps> struct Thunk {
  template <size_t... I> static void go(void (*fn)(Ps...), const unsigned char* args, std::index_sequence<I...>) {
    (void)args;
    fn(load_param<Ps>(args + Layout<Ps...>::offset(I))...);
  }
  static void call(AnyFn f, const unsigned char* args) {
    go(reinterpret_cast<void (*)(Ps...)>(f), args, std::index_sequence_for<Ps...>{});
  }
};

// One static Registrar per entry point (see DL_EMU_REGISTER in cuda_shim.h).
struct Registrar {
  template <class... Ps> Registrar(const char* name, void (*fn)(Ps...), uint32_t max_threads = 1024) {
    static_assert(std::conjunction<std::is_trivially_copyable<Ps>...>::value,
                  "kernel parameters must be trivially copyable");
    register_entry(
        Entry{name, reinterpret_cast<AnyFn>(fn), &Thunk<Ps...>::call, Layout<Ps...>::total(), max_threads});
  }
};

// For the self-test and benchmarks: which context switch this build uses ("x86-64 asm" or
// "ucontext"), the fiber stack size, and the number of fiber resumptions on this OS thread.
const char* switch_impl();
size_t stack_size();
uint64_t resume_count();

}  // namespace dl_emu
