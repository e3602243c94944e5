// The CUDA language for g++: include this before a .cu file to compile its device code for the
// emulated device (fiber.h). Needs NVIDIA's include folder (cuda_fp16.h, cuda_bf16.h) on the
// include path; their host-side half/bfloat16 conversions serve as they are.
//
// Defines __CUDACC__ and __CUDA_ARCH__ only after <cmath>, cuda_fp16.h and cuda_bf16.h are in, so
// that a .cu file's own includes of them are no-ops and its device branches are taken.
//
// Supported: __global__ / __device__ / __host__ / __forceinline__ / __launch_bounds__ (ignored),
// __shared__ (static thread_local: the blocks of a launch run one after another on one OS
// thread), one-dimensional threadIdx / blockIdx / blockDim / gridDim, __syncthreads and its
// _count/_and/_or forms, __syncwarp, __shfl{,_up,_down,_xor}_sync (any trivially copyable type of
// at most 8 bytes, with width), __ballot_sync, __any_sync, __all_sync, __match_{any,all}_sync,
// __reduce_{add,min,max,and,or,xor}_sync, the atomic* functions (plain read-modify-write: fibers
// switch only at barriers), __ldg, __trap, __nanosleep (a yield to the block's other threads),
// warpSize, a few intrinsics (__popc, __clz, __ffs, __expf, ...) and min/max overloads (define
// DL_EMU_NO_MINMAX to leave them out).
// Not supported: extern __shared__ (dynamic shared memory), __activemask, __noinline__,
// cooperative groups, 2-D/3-D launches, device-side assert (it is the host's). A spin-wait
// without __nanosleep never yields, so it hangs where it waits for another thread of the block.
// __shared__ variables keep their values from block to block (on a GPU they start undefined).
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmath>
#include <type_traits>

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "fiber.h"

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static thread_local
#undef __constant__
#define __constant__
#undef __managed__
#define __managed__
#undef __grid_constant__
#define __grid_constant__
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#undef __launch_bounds__
#define __launch_bounds__(...)

#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

// Registers an entry point by name with the emulated device (its parameter types are deduced).
// An optional second argument is the kernel's __launch_bounds__ (the emulator cannot see the
// attribute itself): a launch with more threads per block then fails with rc 3, as on CUDA.
#define DL_EMU_REGISTER(...) DL_EMU_REGISTER_(__VA_ARGS__, 1024u, 0)
#define DL_EMU_REGISTER_(fn, max_threads, ...) \
  static const ::dl_emu::Registrar dl_emu_registrar_##fn(#fn, &fn, max_threads);
// The hook that kernels.cu expands after every entry point: DL_REGISTER_ENTRY(fn) or
// DL_REGISTER_ENTRY(fn, max_threads_per_block).
#ifndef DL_REGISTER_ENTRY
#define DL_REGISTER_ENTRY(...) DL_EMU_REGISTER(__VA_ARGS__)
#endif

// ---- built-in variables (one-dimensional launches) ----
#define threadIdx (::uint3{::dl_emu::tls_view.tid, 0u, 0u})
#define blockIdx (::uint3{::dl_emu::tls_view.block_idx, 0u, 0u})
#define blockDim (::dim3(::dl_emu::tls_view.block_dim, 1u, 1u))
#define gridDim (::dim3(::dl_emu::tls_view.grid_dim, 1u, 1u))
static constexpr int warpSize = 32;

// ---- synchronization ----
inline void __syncthreads() { ::dl_emu::block_barrier(::dl_emu::K_SYNCTHREADS, 0); }
inline int __syncthreads_count(int p) { return ::dl_emu::block_barrier(::dl_emu::K_SYNCTHREADS_COUNT, p); }
inline int __syncthreads_and(int p) { return ::dl_emu::block_barrier(::dl_emu::K_SYNCTHREADS_AND, p); }
inline int __syncthreads_or(int p) { return ::dl_emu::block_barrier(::dl_emu::K_SYNCTHREADS_OR, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::dl_emu::warp_op(::dl_emu::K_SYNCWARP, mask, 0, 0, 32); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) { ::dl_emu::yield(); }
[[noreturn]] inline void __trap() { ::dl_emu::trap("__trap()"); }
[[noreturn]] inline void __brkpt() { ::dl_emu::trap("__brkpt()"); }

namespace dl_emu {
template <class T> inline uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "the emulated warp operations take trivially copyable values of at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T> inline T from_bits(uint64_t b) {
  T v;
  memcpy(static_cast<void*>(&v), &b, sizeof(T));
  return v;
}
template <class T> struct same_type {
  using type = T;
};
}  // namespace dl_emu

template <class T> inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
  return ::dl_emu::from_bits<T>(::dl_emu::warp_op(::dl_emu::K_SHFL, mask, ::dl_emu::to_bits(var), srcLane, width));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::dl_emu::from_bits<T>(
      ::dl_emu::warp_op(::dl_emu::K_SHFL_UP, mask, ::dl_emu::to_bits(var), int32_t(delta), width));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::dl_emu::from_bits<T>(
      ::dl_emu::warp_op(::dl_emu::K_SHFL_DOWN, mask, ::dl_emu::to_bits(var), int32_t(delta), width));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
  return ::dl_emu::from_bits<T>(
      ::dl_emu::warp_op(::dl_emu::K_SHFL_XOR, mask, ::dl_emu::to_bits(var), laneMask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(::dl_emu::warp_op(::dl_emu::K_BALLOT, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) { return int(::dl_emu::warp_op(::dl_emu::K_ANY, mask, pred != 0, 0, 32)); }
inline int __all_sync(unsigned mask, int pred) { return int(::dl_emu::warp_op(::dl_emu::K_ALL, mask, pred != 0, 0, 32)); }
template <class T> inline unsigned __match_any_sync(unsigned mask, T value) {
  return unsigned(::dl_emu::warp_op(::dl_emu::K_MATCH_ANY, mask, ::dl_emu::to_bits(value), 0, 32));
}
template <class T> inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
  const uint64_t r = ::dl_emu::warp_op(::dl_emu::K_MATCH_ALL, mask, ::dl_emu::to_bits(value), 0, 32);
  *pred = int(r >> 32);
  return unsigned(r);
}
#define DL_EMU_REDUCE(NAME, KIND)                                                                   \
  inline unsigned NAME(unsigned mask, unsigned v) {                                                \
    return unsigned(::dl_emu::warp_op(::dl_emu::KIND, mask, v, 0, 32));                            \
  }                                                                                                \
  inline int NAME(unsigned mask, int v) { return int(::dl_emu::warp_op(::dl_emu::KIND, mask, uint32_t(v), 1, 32)); }
DL_EMU_REDUCE(__reduce_add_sync, K_REDUCE_ADD)
DL_EMU_REDUCE(__reduce_min_sync, K_REDUCE_MIN)
DL_EMU_REDUCE(__reduce_max_sync, K_REDUCE_MAX)
DL_EMU_REDUCE(__reduce_and_sync, K_REDUCE_AND)
DL_EMU_REDUCE(__reduce_or_sync, K_REDUCE_OR)
DL_EMU_REDUCE(__reduce_xor_sync, K_REDUCE_XOR)
#undef DL_EMU_REDUCE

// ---- atomics: plain read-modify-write (a fiber is never interrupted between barriers) ----
#define DL_EMU_ATOMIC(NAME, EXPR)                                                   \
  template <class T> inline T NAME(T* p, typename ::dl_emu::same_type<T>::type v) { \
    static_assert(std::is_arithmetic<T>::value, #NAME " takes a number");          \
    const T old = *p;                                                               \
    *p = (EXPR);                                                                    \
    return old;                                                                     \
  }
DL_EMU_ATOMIC(atomicAdd, T(old + v))
DL_EMU_ATOMIC(atomicSub, T(old - v))
DL_EMU_ATOMIC(atomicExch, v)
DL_EMU_ATOMIC(atomicMin, v < old ? v : old)
DL_EMU_ATOMIC(atomicMax, v > old ? v : old)
DL_EMU_ATOMIC(atomicAnd, T(old & v))
DL_EMU_ATOMIC(atomicOr, T(old | v))
DL_EMU_ATOMIC(atomicXor, T(old ^ v))
#undef DL_EMU_ATOMIC
inline unsigned atomicInc(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old >= v ? 0u : old + 1u;
  return old;
}
inline unsigned atomicDec(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = (old == 0u || old > v) ? v : old - 1u;
  return old;
}
template <class T>
inline T atomicCAS(T* p, typename ::dl_emu::same_type<T>::type compare, typename ::dl_emu::same_type<T>::type v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

template <class T> inline T __ldg(const T* p) { return *p; }

// ---- intrinsics ----
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  __extension__ typedef unsigned __int128 u128;
  return (unsigned long long)((u128(a) * b) >> 64);
}
inline float __int_as_float(int x) { return ::dl_emu::from_bits<float>(uint32_t(x)); }
inline int __float_as_int(float x) { return int(uint32_t(::dl_emu::to_bits(x))); }
inline float __uint_as_float(unsigned x) { return ::dl_emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return unsigned(::dl_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::dl_emu::from_bits<double>(uint64_t(x)); }
inline long long __double_as_longlong(double x) { return (long long)::dl_emu::to_bits(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x > 0.f ? (x < 1.f ? x : 1.f) : 0.f; }  // NaN -> 0
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return fma(x, y, z); }

#ifndef DL_EMU_NO_MINMAX
#define DL_EMU_MINMAX(T)                               \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
DL_EMU_MINMAX(int)
DL_EMU_MINMAX(unsigned)
DL_EMU_MINMAX(long)
DL_EMU_MINMAX(unsigned long)
DL_EMU_MINMAX(long long)
DL_EMU_MINMAX(unsigned long long)
#undef DL_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
#endif
