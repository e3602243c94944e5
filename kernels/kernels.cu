// CUDA entry points: the loss bodies of kernels/losses.def run by the
// device executor. build.rs compiles this file with nvcc into one embedded fatbin.
//
// Forward: one grid-stride pass that writes the element losses ('none') or one partial sum per
// block, then dl_finalize_* adds the partials in a fixed order and applies avg_factor and
// loss_weight on the device (no value is read back to the host). Backward: one grid-stride pass
// that writes the gradient of pred. No floating-point atomics: results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dispatch.cuh"

// The emulated device (kernels/emu/) compiles this very file with the host compiler and lists
// every entry point, with its __launch_bounds__, through this hook; for nvcc it is empty.
#ifndef DL_REGISTER_ENTRY
#define DL_REGISTER_ENTRY(...)
#endif

DL_NAMESPACE_BEGIN
namespace dev {

constexpr int THREADS = 256;

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <class A, class T, class I> __device__ __forceinline__ A ld(const T* p, I k) { return A(p[k]); }
template <> __device__ __forceinline__ float ld<float, __half, uint32_t>(const __half* p, uint32_t k) {
  return __half2float(p[k]);
}
template <> __device__ __forceinline__ float ld<float, __half, uint64_t>(const __half* p, uint64_t k) {
  return __half2float(p[k]);
}
template <> __device__ __forceinline__ float ld<float, __nv_bfloat16, uint32_t>(const __nv_bfloat16* p, uint32_t k) {
  return __bfloat162float(p[k]);
}
template <> __device__ __forceinline__ float ld<float, __nv_bfloat16, uint64_t>(const __nv_bfloat16* p, uint64_t k) {
  return __bfloat162float(p[k]);
}
template <class T, class A> __device__ __forceinline__ T st(A v) { return T(v); }
template <> __device__ __forceinline__ __half st<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// Sum over the block, in a fixed order; the result is valid in thread 0.
template <class A> __device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_sums[THREADS / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (THREADS / 32) ? warp_sums[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// Element (i, j)'s target; `bad` marks a label outside [0, C] in strict mode.
template <class A> struct Tgt {
  A t;
  bool bad;
};
template <class A, class T, class I> __device__ __forceinline__ Tgt<A> target_at(const Args& a, I k, I i, I j) {
  if (a.target_mode == TARGET_DENSE) return {ld<A>(reinterpret_cast<const T*>(a.target), k), false};
  const int64_t l = reinterpret_cast<const int64_t*>(a.target)[i];
  const bool bad = (a.flags & FLAG_STRICT_LABELS) && (l < 0 || l > a.c);
  if (int64_t(j) != l) return {A(0), bad};
  return {a.score ? ld<A>(reinterpret_cast<const T*>(a.score), i) : A(1), bad};
}

template <class A, class T, class I> __device__ __forceinline__ A weight_at(const Args& a, I i, I j) {
  if (!a.weight) return A(1);
  return ld<A>(reinterpret_cast<const T*>(a.weight), I(i * I(a.w_sn) + j * I(a.w_sc)));
}

template <class E, class T, class I> __device__ __forceinline__ void forward(const Args& a) {
  using A = typename AccOf<T>::type;
  const E e(a);
  const I c = I(a.c), total = I(a.n) * c;
  const T* pred = reinterpret_cast<const T*>(a.pred);
  T* out = reinterpret_cast<T*>(a.out);
  const A lw = A(a.loss_weight);
  const A nan = A(0) / A(0);
  const bool row_sum = (a.flags & FLAG_ROW_SUM) != 0;
  if (a.reduction == RED_NONE && row_sum) {
    // Per-anchor losses (QFL 'none'): one thread per row.
    for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < I(a.n); i += I(gridDim.x) * blockDim.x) {
      A s = A(0);
      bool bad = false;
      for (I j = 0; j < c; ++j) {
        const Tgt<A> t = target_at<A, T>(a, I(i * c + j), i, j);
        bad |= t.bad;
        s += e.loss(ld<A>(pred, I(i * c + j)), t.t) * weight_at<A, T>(a, i, j);
      }
      out[i] = st<T>(bad ? nan : lw * s);
    }
    return;
  }
  A acc = A(0);
  for (I k = blockIdx.x * I(blockDim.x) + threadIdx.x; k < total; k += I(gridDim.x) * blockDim.x) {
    const I i = k / c, j = k - i * c;
    const Tgt<A> t = target_at<A, T>(a, k, i, j);
    A l = e.loss(ld<A>(pred, k), t.t) * weight_at<A, T>(a, i, j);
    if (t.bad) l = nan;
    if (a.reduction == RED_NONE)
      out[k] = st<T>(lw * l);
    else
      acc += l;
  }
  if (a.reduction != RED_NONE) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) reinterpret_cast<A*>(a.partials)[blockIdx.x] = acc;
  }
}

template <class E, class T, class I> __device__ __forceinline__ void backward(const Args& a) {
  using A = typename AccOf<T>::type;
  const E e(a);
  const I c = I(a.c), total = I(a.n) * c;
  const T* pred = reinterpret_cast<const T*>(a.pred);
  const T* go = reinterpret_cast<const T*>(a.grad_out);
  T* out = reinterpret_cast<T*>(a.out);
  const A scale = A(a.loss_weight) / reduction_divisor<A>(a);
  const A nan = A(0) / A(0);
  for (I k = blockIdx.x * I(blockDim.x) + threadIdx.x; k < total; k += I(gridDim.x) * blockDim.x) {
    const I i = k / c, j = k - i * c;
    const Tgt<A> t = target_at<A, T>(a, k, i, j);
    A g = e.grad(ld<A>(pred, k), t.t) * weight_at<A, T>(a, i, j) * scale *
          ld<A>(go, I(i * I(a.g_sn) + j * I(a.g_sc)));
    out[k] = st<T>(t.bad ? nan : g);
  }
}

// I: the index type. 32-bit indexing (a much cheaper division) serves whenever the element
// count allows it; the host picks the *_k64 entry points otherwise.
template <class E, class T, class I> __device__ __forceinline__ void run(int32_t pass, const Args& a) {
  if (pass == PASS_FORWARD)
    forward<E, T, I>(a);
  else
    backward<E, T, I>(a);
}

// run_<name><T, I>(pass, a) for every loss of kernels/losses.def: its functor, chosen by
// DL_DISPATCH_<name>, run by the executor above.
#define DL_RUN(...) run<__VA_ARGS__, T, I>(pass, a)
#define DL_DEVICE_RUNNER(NAME, ID)                                                        \
  template <class T, class I> __device__ __forceinline__ void run_##NAME(int32_t pass, const Args& a) { \
    using A = typename AccOf<T>::type;                                                    \
    DL_DISPATCH_##NAME(a, A, DL_RUN);                                                     \
  }
DL_LOSSES(DL_DEVICE_RUNNER)
#undef DL_DEVICE_RUNNER
#undef DL_RUN

template <class T> __device__ __forceinline__ void finalize(const Args& a) {
  using A = typename AccOf<T>::type;
  const A* partials = reinterpret_cast<const A*>(a.partials);
  A s = A(0);
  for (int b = threadIdx.x; b < a.n_partials; b += THREADS) s += partials[b];
  s = block_sum(s);
  if (threadIdx.x == 0) reinterpret_cast<T*>(a.out)[0] = st<T>(A(a.loss_weight) * (s / reduction_divisor<A>(a)));
}

}  // namespace dev
DL_NAMESPACE_END

#define DL_ENTRY_I(NAME, T, PASS, SUFFIX, I)                                            \
  extern "C" __global__ void __launch_bounds__(dl::dev::THREADS) dl_##NAME##_##PASS##_##T##_##SUFFIX(dl::Args a) { \
    dl::dev::run_##NAME<DL_TYPE_##T, I>(DL_PASS_##PASS, a);                                 \
  }                                                                                         \
  DL_REGISTER_ENTRY(dl_##NAME##_##PASS##_##T##_##SUFFIX, dl::dev::THREADS)
#define DL_ENTRY(NAME, T)                                     \
  DL_ENTRY_I(NAME, T, forward, k, uint32_t)                   \
  DL_ENTRY_I(NAME, T, forward, k64, uint64_t)                 \
  DL_ENTRY_I(NAME, T, backward, k, uint32_t)                  \
  DL_ENTRY_I(NAME, T, backward, k64, uint64_t)
#define DL_PASS_forward dl::PASS_FORWARD
#define DL_PASS_backward dl::PASS_BACKWARD

#define DL_TYPE_f32 float
#define DL_TYPE_f64 double
#define DL_TYPE_f16 __half
#define DL_TYPE_bf16 __nv_bfloat16

#define DL_ALL_TYPES(NAME, ID) \
  DL_ENTRY(NAME, f32)          \
  DL_ENTRY(NAME, f64)          \
  DL_ENTRY(NAME, f16)          \
  DL_ENTRY(NAME, bf16)

DL_LOSSES(DL_ALL_TYPES)

#define DL_FINALIZE(T) \
  extern "C" __global__ void __launch_bounds__(dl::dev::THREADS) dl_finalize_##T##_k(dl::Args a) { \
    dl::dev::finalize<DL_TYPE_##T>(a);                                                              \
  }                                                                                                 \
  DL_REGISTER_ENTRY(dl_finalize_##T##_k, dl::dev::THREADS)
DL_FINALIZE(f32)
DL_FINALIZE(f64)
DL_FINALIZE(f16)
DL_FINALIZE(bf16)
