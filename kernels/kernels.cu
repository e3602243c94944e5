// CUDA entry points: the loss bodies of kernels/losses.def run by the device executors, one per
// body shape (DESIGN.md section 9). build.rs compiles this file with nvcc into one embedded fatbin.
//
// Element bodies: a grid-stride pass over the elements. Row bodies: a warp per row (online max
// and sum of the row's softmax). Both forward passes write the losses ('none') or one partial sum
// per block, then dl_finalize_* adds the partials in a fixed order and applies the divisor and
// loss_weight on the device (no value is read back to the host). Backward: one pass that writes
// the gradient of pred. Histogram bodies (GHM) run a pre-pass first: per-block integer bin counts,
// then dl_hist_finalize_* (one block) adds them in order, updates the momentum state and writes
// the bin weights and the divisor. No floating-point atomics: results are bitwise reproducible.
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

// A forward reduction's per-block values: the block's loss sum at partials[block] and, when the
// divisor is the count of valid elements (AVG_COUNT_VALID), their count at
// partials[n_partials + block]. Every thread of the block calls it.
// COUNTS: compiled only for the bodies that can count (the others never get AVG_COUNT_VALID).
template <bool COUNTS, class A> __device__ __forceinline__ void write_partials(const Args& a, A acc, A valid) {
  acc = block_sum(acc);
  if (threadIdx.x == 0) reinterpret_cast<A*>(a.partials)[blockIdx.x] = acc;
  if (COUNTS && a.has_avg_factor == AVG_COUNT_VALID) {
    __syncthreads();  // block_sum's shared memory is reused
    valid = block_sum(valid);
    if (threadIdx.x == 0) reinterpret_cast<A*>(a.partials)[a.n_partials + blockIdx.x] = valid;
  }
}

// Element (i, j)'s target; `bad` marks a label outside [0, C] in strict mode, `valid` false an
// element that an IGNORE_INDEX body ignores.
template <class A> struct Tgt {
  A t;
  bool bad, valid;
};
template <class E, class A, class T, class I> __device__ __forceinline__ Tgt<A> target_at(const Args& a, I k, I i, I j) {
  if (a.target_mode == TARGET_DENSE) {
    const A t = ld<A>(reinterpret_cast<const T*>(a.target), k);
    const bool valid = !E::IGNORE_INDEX || (t >= A(0) && t != A(a.i0));
    return {t, false, valid};
  }
  const int64_t l = reinterpret_cast<const int64_t*>(a.target)[i];
  const bool bad = (a.flags & FLAG_STRICT_LABELS) && (l < 0 || l > a.c);
  const bool valid = !E::IGNORE_INDEX || (l >= 0 && l != a.i0);
  if (int64_t(j) != l || !valid) return {A(0), bad, valid};
  return {a.score ? ld<A>(reinterpret_cast<const T*>(a.score), i) : A(1), bad, valid};
}

template <class A, class T, class I> __device__ __forceinline__ A weight_at(const Args& a, I i, I j) {
  if (!a.weight) return A(1);
  return ld<A>(reinterpret_cast<const T*>(a.weight), I(i * I(a.w_sn) + j * I(a.w_sc)));
}

// The element functor's loss and gradient, with its per-class parameter where it takes one.
template <class E, class A, class I> __device__ __forceinline__ A elem_loss(const E& e, const Args& a, A x, A t, I j) {
  if constexpr (E::COLUMN_PARAM) return e.loss(x, t, a.aux ? reinterpret_cast<const A*>(a.aux)[j] : A(1));
  else return e.loss(x, t);
}
template <class E, class A, class I> __device__ __forceinline__ A elem_grad(const E& e, const Args& a, A x, A t, I j) {
  if constexpr (E::COLUMN_PARAM) return e.grad(x, t, a.aux ? reinterpret_cast<const A*>(a.aux)[j] : A(1));
  else return e.grad(x, t);
}
// The weight of an element: its weight, 0 where ignored, and for a histogram body its bin's
// weight where its weight is > 0.
template <class E, class A> __device__ __forceinline__ A elem_weight(const E& e, const Args& a, A w, A x, const Tgt<A>& t) {
  if constexpr (E::IGNORE_INDEX) {
    if (!t.valid) return A(0);
  }
  if constexpr (E::HISTOGRAM) {
    if (!(w > A(0))) return A(0);
    // The finalize wrote the edges after the bin weights.
    const A* hw = reinterpret_cast<const A*>(a.hist_weights);
    const int bins = a.bins;
    const int b = hist_bin(e.hist_g(x, t.t), bins, A(a.last_edge), [hw, bins](int k) { return hw[bins + k]; });
    return b < 0 ? A(0) : hw[b];
  } else {
    return w;
  }
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
        const Tgt<A> t = target_at<E, A, T>(a, I(i * c + j), i, j);
        const A x = ld<A>(pred, I(i * c + j));
        bad |= t.bad;
        s += elem_loss(e, a, x, t.t, j) * elem_weight(e, a, weight_at<A, T>(a, i, j), x, t);
      }
      out[i] = st<T>(bad ? nan : lw * s);
    }
    return;
  }
  A acc = A(0), valid = A(0);
  for (I k = blockIdx.x * I(blockDim.x) + threadIdx.x; k < total; k += I(gridDim.x) * blockDim.x) {
    const I i = k / c, j = k - i * c;
    const Tgt<A> t = target_at<E, A, T>(a, k, i, j);
    const A x = ld<A>(pred, k);
    A l = elem_loss(e, a, x, t.t, j) * elem_weight(e, a, weight_at<A, T>(a, i, j), x, t);
    if (t.bad) l = nan;
    if constexpr (E::IGNORE_INDEX) valid += A(t.valid);
    if (a.reduction == RED_NONE)
      out[k] = st<T>(lw * l);
    else
      acc += l;
  }
  if (a.reduction != RED_NONE) write_partials<E::IGNORE_INDEX>(a, acc, valid);
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
    const Tgt<A> t = target_at<E, A, T>(a, k, i, j);
    const A x = ld<A>(pred, k);
    A g = elem_grad(e, a, x, t.t, j) * elem_weight(e, a, weight_at<A, T>(a, i, j), x, t) * scale *
          ld<A>(go, I(i * I(a.g_sn) + j * I(a.g_sc)));
    out[k] = st<T>(t.bad ? nan : g);
  }
}

// ---- Row executor: a warp per row. Lane l reads columns l, l + 32, ... of the row, keeping an
// online log-sum-exp; the lanes' states are merged by a butterfly (every lane ends with the same
// value). The forward pass keeps each row's log-sum-exp in row_stat for the backward pass.
constexpr int WARPS = THREADS / 32;

template <class E, class A, class T, class I> __device__ __forceinline__ SparseTarget<A> row_target(const E& e, const Args& a, I i) {
  if (a.target_mode == TARGET_ROW_VALUE) return e.target(0, ld<A>(reinterpret_cast<const T*>(a.target), i));
  return e.target(reinterpret_cast<const int64_t*>(a.target)[i], A(0));
}

template <class E, class T, class I> __device__ __forceinline__ void row_forward(const Args& a) {
  using A = typename AccOf<T>::type;
  const E e(a);
  const I c = I(a.c), n = I(a.n);
  const int lane = threadIdx.x & 31;
  const T* pred = reinterpret_cast<const T*>(a.pred);
  T* out = reinterpret_cast<T*>(a.out);
  A* lse_out = reinterpret_cast<A*>(a.row_stat);
  const A lw = A(a.loss_weight), nan = A(0) / A(0);
  A acc = A(0), valid = A(0);
  for (I i = I(blockIdx.x) * WARPS + (threadIdx.x >> 5); i < n; i += I(gridDim.x) * WARPS) {
    const SparseTarget<A> st_ = row_target<E, A, T>(e, a, i);
    const T* x = pred + i * c;
    Lse<A> r{A(0), A(0)};
    if (st_.valid)
      for (I j = lane; j < c; j += 32) r.add(ld<A>(x, j));
    for (int o = 16; o > 0; o >>= 1) {
      const A om = __shfl_xor_sync(0xffffffffu, r.m, o), os = __shfl_xor_sync(0xffffffffu, r.s, o);
      r.merge(om, os);
    }
    if (lane == 0) {
      A l = A(0);
      if (st_.bad) {
        l = nan;
      } else if (st_.valid) {
        const A lse = r.value();
        for (int k = 0; k < 2; ++k)
          if (st_.coef[k] != A(0)) l += st_.coef[k] * (lse - ld<A>(x, I(st_.idx[k])));
        l *= weight_at<A, T>(a, i, I(0));
        if (lse_out) lse_out[i] = lse;
      }
      valid += A(st_.valid);
      if (a.reduction == RED_NONE)
        out[i] = st<T>(lw * l);
      else
        acc += l;
    }
  }
  if (a.reduction != RED_NONE) write_partials<true>(a, acc, valid);
}

template <class E, class T, class I> __device__ __forceinline__ void row_backward(const Args& a) {
  using A = typename AccOf<T>::type;
  const E e(a);
  const I c = I(a.c), n = I(a.n);
  const int lane = threadIdx.x & 31;
  const T* pred = reinterpret_cast<const T*>(a.pred);
  const T* go = reinterpret_cast<const T*>(a.grad_out);
  const A* lse_in = reinterpret_cast<const A*>(a.row_stat);
  T* out = reinterpret_cast<T*>(a.out);
  const A scale = A(a.loss_weight) / reduction_divisor<A>(a), nan = A(0) / A(0);
  for (I i = I(blockIdx.x) * WARPS + (threadIdx.x >> 5); i < n; i += I(gridDim.x) * WARPS) {
    const SparseTarget<A> st_ = row_target<E, A, T>(e, a, i);
    const T* x = pred + i * c;
    T* g = out + i * c;
    if (st_.bad || !st_.valid) {
      const T v = st<T>(st_.bad ? nan : A(0));
      for (I j = lane; j < c; j += 32) g[j] = v;
      continue;
    }
    const A lse = lse_in[i];
    const A coef = weight_at<A, T>(a, i, I(0)) * scale * ld<A>(go, I(i * I(a.g_sn)));
    const A total = st_.coef[0] + st_.coef[1];
    for (I j = lane; j < c; j += 32) {
      A d = dl_exp(ld<A>(x, j) - lse) * total;
      if (int64_t(j) == st_.idx[0]) d -= st_.coef[0];
      if (int64_t(j) == st_.idx[1]) d -= st_.coef[1];
      g[j] = st<T>(d * coef);
    }
  }
}

// ---- Histogram executor, pass 1: per-block counts of the elements with weight > 0 in each bin
// (integer atomics in shared memory: exact in any order), their total count and weight sum.
template <class E, class T, class I> __device__ __forceinline__ void histogram(const Args& a) {
  using A = typename AccOf<T>::type;
  if constexpr (E::HISTOGRAM) {
    __shared__ int counts[MAX_BINS + 1];
    const E e(a);
    const int bins = a.bins;
    for (int b = threadIdx.x; b <= bins; b += blockDim.x) counts[b] = 0;
    __syncthreads();
    const I c = I(a.c), total = I(a.n) * c;
    const T* pred = reinterpret_cast<const T*>(a.pred);
    A wsum = A(0);
    for (I k = blockIdx.x * I(blockDim.x) + threadIdx.x; k < total; k += I(gridDim.x) * blockDim.x) {
      const I i = k / c, j = k - i * c;
      const A w = weight_at<A, T>(a, i, j);
      wsum += w;
      if (w > A(0)) {
        const Tgt<A> t = target_at<E, A, T>(a, k, i, j);
        atomicAdd(&counts[bins], 1);
        const int b = hist_bin(e.hist_g(ld<A>(pred, k), t.t), bins, A(a.last_edge),
                               [bins](int q) { return hist_edge<A>(q, bins); });
        if (b >= 0) atomicAdd(&counts[b], 1);
      }
    }
    __syncthreads();
    int* dst = reinterpret_cast<int*>(a.hist_counts) + int64_t(blockIdx.x) * (bins + 1);
    for (int b = threadIdx.x; b <= bins; b += blockDim.x) dst[b] = counts[b];
    wsum = block_sum(wsum);
    if (threadIdx.x == 0) reinterpret_cast<A*>(a.partials)[blockIdx.x] = wsum;
  }
}

// I: the index type. 32-bit indexing (a much cheaper division) serves whenever the element
// count allows it; the host picks the *_k64 entry points otherwise.
template <class E, class T, class I> __device__ __forceinline__ void run(int32_t pass, const Args& a) {
  if constexpr (E::SHAPE == SHAPE_ROW) {
    if (pass == PASS_FORWARD)
      row_forward<E, T, I>(a);
    else
      row_backward<E, T, I>(a);
  } else {
    if (pass == PASS_FORWARD)
      forward<E, T, I>(a);
    else if (pass == PASS_BACKWARD)
      backward<E, T, I>(a);
    else
      histogram<E, T, I>(a);
  }
}

// run_<name><T, I>(pass, a) for every loss of kernels/losses.def: its functor, chosen by
// DL_DISPATCH_<name>, run by the executor above.
#define DL_RUN(...) run<__VA_ARGS__, T, I>(pass, a)
#define DL_DEVICE_RUNNER(NAME, ID, STAGES)                                                        \
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
  A divisor;
  if (a.has_avg_factor == AVG_COUNT_VALID) {
    // The per-block counts are integers: summed as such, exact in any order.
    long long cnt = 0;
    for (int b = threadIdx.x; b < a.n_partials; b += THREADS) cnt += (long long)(partials[a.n_partials + b]);
    __syncthreads();
    cnt = block_sum(cnt);
    // The count is the divisor's avg_factor, for this pass and the backward one.
    if (threadIdx.x == 0 && a.reduction == RED_MEAN) *reinterpret_cast<A*>(a.avg_factor) = A(cnt);
    divisor = A(cnt) + A(AVG_FACTOR_EPS);
  } else {
    divisor = reduction_divisor<A>(a);
  }
  if (threadIdx.x == 0) reinterpret_cast<T*>(a.out)[0] = st<T>(A(a.loss_weight) * (s / divisor));
}

// Histogram executor, pass 2 (one block): adds the per-block counts of each bin in block order,
// updates the momentum state of the non-empty bins, and writes each bin's weight, divided by the
// number of non-empty bins, then the bins + 1 edges, to hist_weights, and the total (the divisor
// of 'mean') to avg_factor.
template <class A> __device__ __forceinline__ void hist_finalize(const Args& a) {
  const int bins = a.bins, nb = a.n_partials;
  const int* counts = reinterpret_cast<const int*>(a.hist_counts);
  A* weights = reinterpret_cast<A*>(a.hist_weights);
  float* state = reinterpret_cast<float*>(a.hist_state);
  __shared__ double tot_s;
  __shared__ int nonempty_s;
  // The total: the count of elements with weight > 0, or (TOT_SUM) the sum of the weights.
  long long valid = 0;
  A wsum = A(0);
  for (int b = threadIdx.x; b < nb; b += THREADS) {
    valid += counts[int64_t(b) * (bins + 1) + bins];
    wsum += reinterpret_cast<const A*>(a.partials)[b];
  }
  valid = block_sum(valid);
  __syncthreads();
  wsum = block_sum(wsum);
  if (threadIdx.x == 0) {
    // Over the label weights as given, before their broadcast (MMDetection's `valid.sum()`).
    const double t = ((a.flags & FLAG_TOT_SUM) ? double(wsum) : double(valid)) / a.hist_replicas;
    tot_s = t > 1.0 ? t : 1.0;
  }
  __syncthreads();
  const double tot = tot_s;
  int nonempty = 0;
  for (int b = threadIdx.x; b < bins; b += THREADS) {
    long long num = 0;
    for (int k = 0; k < nb; ++k) num += counts[int64_t(k) * (bins + 1) + b];
    weights[b] = hist_bin_weight<A>(state, b, num, tot, a.momentum);
    nonempty += num > 0;
  }
  __syncthreads();
  nonempty = block_sum(nonempty);
  if (threadIdx.x == 0) nonempty_s = nonempty;
  __syncthreads();
  if (nonempty_s > 0)
    for (int b = threadIdx.x; b < bins; b += THREADS) weights[b] = weights[b] / A(nonempty_s);
  // The edges, for the element passes (a table instead of a division per element).
  for (int b = threadIdx.x; b < bins; b += THREADS) weights[bins + b] = hist_edge<A>(b, bins);
  if (threadIdx.x == 0) weights[2 * bins] = A(a.last_edge);
  if (threadIdx.x == 0) *reinterpret_cast<A*>(a.avg_factor) = A(tot);
}

}  // namespace dev
DL_NAMESPACE_END

#define DL_ENTRY_I(NAME, T, PASS, SUFFIX, I)                                                                    \
  extern "C" __global__ void __launch_bounds__(dl::dev::THREADS) dl_##NAME##_##PASS##_##T##_##SUFFIX(dl::Args a) { \
    dl::dev::run_##NAME<DL_TYPE_##T, I>(DL_PASS_##PASS, a);                                                       \
  }                                                                                                               \
  DL_REGISTER_ENTRY(dl_##NAME##_##PASS##_##T##_##SUFFIX, dl::dev::THREADS)
#define DL_ENTRY_PASS(NAME, T, PASS)           \
  DL_ENTRY_I(NAME, T, PASS, k, uint32_t)       \
  DL_ENTRY_I(NAME, T, PASS, k64, uint64_t)
// The passes of each kind of stages (kernels/losses.def).
#define DL_STAGES_DIRECT(NAME, T) \
  DL_ENTRY_PASS(NAME, T, forward)  \
  DL_ENTRY_PASS(NAME, T, backward)
#define DL_STAGES_HISTOGRAM(NAME, T) \
  DL_STAGES_DIRECT(NAME, T)          \
  DL_ENTRY_PASS(NAME, T, histogram)
#define DL_PASS_forward dl::PASS_FORWARD
#define DL_PASS_backward dl::PASS_BACKWARD
#define DL_PASS_histogram dl::PASS_HISTOGRAM

#define DL_TYPE_f32 float
#define DL_TYPE_f64 double
#define DL_TYPE_f16 __half
#define DL_TYPE_bf16 __nv_bfloat16

#define DL_ALL_TYPES(NAME, ID, STAGES) \
  DL_STAGES_##STAGES(NAME, f32)        \
  DL_STAGES_##STAGES(NAME, f64)        \
  DL_STAGES_##STAGES(NAME, f16)        \
  DL_STAGES_##STAGES(NAME, bf16)

DL_LOSSES(DL_ALL_TYPES)

#define DL_FINALIZE(T)                                                                              \
  extern "C" __global__ void __launch_bounds__(dl::dev::THREADS) dl_finalize_##T##_k(dl::Args a) { \
    dl::dev::finalize<DL_TYPE_##T>(a);                                                              \
  }                                                                                                 \
  DL_REGISTER_ENTRY(dl_finalize_##T##_k, dl::dev::THREADS)
DL_FINALIZE(f32)
DL_FINALIZE(f64)
DL_FINALIZE(f16)
DL_FINALIZE(bf16)

// By accumulation type: f16 and bf16 use f32's.
#define DL_HIST_FINALIZE(T)                                                                              \
  extern "C" __global__ void __launch_bounds__(dl::dev::THREADS) dl_hist_finalize_##T##_k(dl::Args a) { \
    dl::dev::hist_finalize<DL_TYPE_##T>(a);                                                              \
  }                                                                                                      \
  DL_REGISTER_ENTRY(dl_hist_finalize_##T##_k, dl::dev::THREADS)
DL_HIST_FINALIZE(f32)
DL_HIST_FINALIZE(f64)
