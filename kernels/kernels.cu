// CUDA entry points: the loss bodies of kernels/losses.def run by the device executors, one per
// body shape (DESIGN.md section 9). build.rs compiles this file with nvcc into one embedded fatbin.
//
// Element bodies: a grid-stride pass over the elements. Row bodies: a warp per row (online max
// and sum of the row's softmax; scan-row bodies scan their row through the warp). Both forward passes write the losses ('none') or one partial sum
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

// A thread's running loss sum, in a register or (SHARED) in shared memory. The IoU and GHM-R
// bodies keep many values live across their division and square-root slow paths (calls); one
// more register there made ptxas spill, a shared-memory slot does not.
template <class A, bool SHARED> struct ThreadSum;
template <class A> struct ThreadSum<A, false> {
  A v = A(0);
  __device__ __forceinline__ A& get() { return v; }
};
template <class A> struct ThreadSum<A, true> {
  A* v;
  __device__ __forceinline__ ThreadSum() {
    __shared__ A sums[THREADS];
    v = sums + threadIdx.x;
    *v = A(0);
  }
  __device__ __forceinline__ A& get() { return *v; }
};

// The zero-weight short-cut's running values of a thread (FLAG_SHORTCUT): the sum of pred * weight
// over the non-zero weights and whether a weight > 0 was seen, in shared memory (see ThreadSum).
template <class A, bool ON> struct ShortcutAcc {
  static constexpr bool on = false;
  __device__ __forceinline__ explicit ShortcutAcc(const Args&) {}
  __device__ __forceinline__ void add(A, A) {}
  __device__ __forceinline__ A sum() const { return A(0); }
  __device__ __forceinline__ int positive() const { return 0; }
};
template <class A> struct ShortcutAcc<A, true> {
  A* sum_;
  int* positive_;
  bool on;
  __device__ __forceinline__ explicit ShortcutAcc(const Args& a) : on((a.flags & FLAG_SHORTCUT) != 0) {
    __shared__ A sum_s[THREADS];
    __shared__ int positive_s[THREADS];
    sum_ = sum_s + threadIdx.x;
    positive_ = positive_s + threadIdx.x;
    *sum_ = A(0);
    *positive_ = 0;
  }
  __device__ __forceinline__ void add(A x, A w) {
    *sum_ += weighted<true>(x, w);
    *positive_ |= int(w > A(0));
  }
  __device__ __forceinline__ A sum() const { return *sum_; }
  __device__ __forceinline__ int positive() const { return *positive_; }
};

// A forward reduction's per-block values, in slots of n_partials (SLOT_*): the loss sum and,
// where the launch asks for them, the valid count (AVG_COUNT_VALID) and the zero-weight
// short-cut's sum and whether a weight > 0 was seen (FLAG_SHORTCUT; a sum of these is 0 only if
// each is). COUNTS, SHORTCUT: compiled only for the bodies that can need them. Every thread of
// the block calls it.
template <bool COUNTS, bool SHORTCUT, class A>
__device__ __forceinline__ void write_partials(const Args& a, A acc, A valid, const ShortcutAcc<A, SHORTCUT>& sc) {
  A* partials = reinterpret_cast<A*>(a.partials);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  if (COUNTS && a.has_avg_factor == AVG_COUNT_VALID) {
    __syncthreads();  // block_sum's shared memory is reused
    valid = block_sum(valid);
    if (threadIdx.x == 0) partials[SLOT_VALID * a.n_partials + blockIdx.x] = valid;
  }
  if (SHORTCUT && (a.flags & FLAG_SHORTCUT)) {
    __syncthreads();
    const A sum = block_sum(sc.sum());
    const int any = __syncthreads_or(sc.positive());
    if (threadIdx.x == 0) {
      partials[SLOT_SHORTCUT * a.n_partials + blockIdx.x] = sum;
      partials[SLOT_POSITIVE * a.n_partials + blockIdx.x] = A(any);
    }
  }
}

// Whether the forward pass took the zero-weight short-cut (its finalize wrote the decision).
template <class A> __device__ __forceinline__ bool shortcut_taken(const Args& a) {
  return (a.flags & FLAG_SHORTCUT) && *reinterpret_cast<const A*>(a.shortcut) != A(0);
}

// The element k = i c + j of a grid-stride loop over [n, c]. INCREMENTAL: advanced by the grid's
// stride without a division per element (a 64-bit one is a subroutine call); otherwise i = k / c
// each step. Which form keeps ptxas from spilling differs by body (build.rs fails on a spill):
// the division-free form for the box-regression bodies, the division for the others.
template <bool INCREMENTAL, class I> struct GridPos {
  I k, c;
  __device__ __forceinline__ explicit GridPos(I c_) : k(blockIdx.x * I(blockDim.x) + threadIdx.x), c(c_) {}
  // Only inside the loop, where c > 0.
  __device__ __forceinline__ I row() const { return k / c; }
  __device__ __forceinline__ I col() const { return k - row() * c; }
  __device__ __forceinline__ void next() { k += I(gridDim.x) * blockDim.x; }
};
template <class I> struct GridPos<true, I> {
  I k, i, j, c, step_i, step_j;
  __device__ __forceinline__ I row() const { return i; }
  __device__ __forceinline__ I col() const { return j; }
  __device__ __forceinline__ explicit GridPos(I c_) : c(c_) {
    const I stride = I(gridDim.x) * blockDim.x;
    k = blockIdx.x * I(blockDim.x) + threadIdx.x;
    i = c > 0 ? k / c : I(0);
    j = k - i * c;
    step_i = c > 0 ? stride / c : I(0);
    step_j = stride - step_i * c;
  }
  __device__ __forceinline__ void next() {
    k += I(gridDim.x) * blockDim.x;
    i += step_i;
    j += step_j;
    if (j >= c) {
      j -= c;
      ++i;
    }
  }
};

// Element (i, j)'s target; `bad` marks a label outside [0, C] in strict mode, `valid` false an
// element that an IGNORE_INDEX body ignores.
template <class A> struct Tgt {
  A t;
  bool bad, valid;
};
template <class E, class A, class T, class I> __device__ __forceinline__ Tgt<A> target_at(const Args& a, I k, I i, I j) {
  // A body without label targets only ever gets dense ones (the host checks).
  if (!E::LABEL_TARGETS || a.target_mode == TARGET_DENSE) {
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
  // A histogram body's loss is never summed per row (GHM): its branch is left out, which keeps
  // ptxas from spilling in GHM-R's forward pass.
  const bool row_sum = !E::HISTOGRAM && (a.flags & FLAG_ROW_SUM) != 0;
  if (a.reduction == RED_NONE && row_sum) {
    // Per-anchor losses (QFL 'none'): one thread per row.
    for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < I(a.n); i += I(gridDim.x) * blockDim.x) {
      A s = A(0);
      bool bad = false;
      for (I j = 0; j < c; ++j) {
        const Tgt<A> t = target_at<E, A, T>(a, I(i * c + j), i, j);
        const A x = ld<A>(pred, I(i * c + j));
        bad |= t.bad;
        s += weighted<E::MASKED_WEIGHTS>(elem_loss(e, a, x, t.t, j), elem_weight(e, a, weight_at<A, T>(a, i, j), x, t));
      }
      out[i] = st<T>(bad ? nan : lw * s);
    }
    return;
  }
  // A histogram body never takes the short-cut (GHM-R has none).
  constexpr bool SHORTCUT = E::MASKED_WEIGHTS && !E::HISTOGRAM;
  ShortcutAcc<A, SHORTCUT> sc(a);
  ThreadSum<A, E::HISTOGRAM && E::MASKED_WEIGHTS> sum;
  A& acc = sum.get();
  A valid = A(0);
  for (GridPos<E::MASKED_WEIGHTS, I> pos(c); pos.k < total; pos.next()) {
    const I k = pos.k, i = pos.row(), j = pos.col();
    const Tgt<A> t = target_at<E, A, T>(a, k, i, j);
    const A x = ld<A>(pred, k);
    const A w = weight_at<A, T>(a, i, j);
    A l = weighted<E::MASKED_WEIGHTS>(elem_loss(e, a, x, t.t, j), elem_weight(e, a, w, x, t));
    if (t.bad) l = nan;
    if constexpr (E::IGNORE_INDEX) valid += A(t.valid);
    if (sc.on) sc.add(x, w);
    if (a.reduction == RED_NONE)
      out[k] = st<T>(lw * l);
    else
      acc += l;
  }
  if (a.reduction != RED_NONE) write_partials<E::IGNORE_INDEX, SHORTCUT>(a, acc, valid, sc);
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
  // The short-cut's gradient: d sum(pred * weight) / d pred = weight.
  const bool shortcut = E::MASKED_WEIGHTS && !E::HISTOGRAM && shortcut_taken<A>(a);
  for (GridPos<E::MASKED_WEIGHTS, I> pos(c); pos.k < total; pos.next()) {
    const I k = pos.k, i = pos.row(), j = pos.col();
    const Tgt<A> t = target_at<E, A, T>(a, k, i, j);
    const A x = ld<A>(pred, k);
    const A w = weight_at<A, T>(a, i, j);
    const A up = ld<A>(go, I(i * I(a.g_sn) + j * I(a.g_sc)));
    A g = shortcut ? w * up
                   : weighted<E::MASKED_WEIGHTS>(elem_grad(e, a, x, t.t, j), elem_weight(e, a, w, x, t)) * scale * up;
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
  if (a.reduction != RED_NONE) write_partials<true, false, A>(a, acc, valid, ShortcutAcc<A, false>(a));
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

// ---- Box executor: a thread per box pair (4 coordinates each of pred and target). The weight is
// per box, or per coordinate (IoU family: MMDetection's (N, 4) weight), averaged over the box.
template <class A, class T, class I> __device__ __forceinline__ A box_weight(const Args& a, I i, A (&wk)[4]) {
  const T* w = reinterpret_cast<const T*>(a.weight);
  if (!w) {
    for (int q = 0; q < 4; ++q) wk[q] = A(1);
    return A(1);
  }
  if (a.w_sc == 0) {
    const A v = ld<A>(w, I(i * I(a.w_sn)));
    for (int q = 0; q < 4; ++q) wk[q] = v;
    return v;
  }
  for (int q = 0; q < 4; ++q) wk[q] = ld<A>(w, I(i * I(a.w_sn) + I(q)));
  return (((wk[0] + wk[1]) + wk[2]) + wk[3]) / A(4);
}

template <class A, class T, class I> __device__ __forceinline__ void load_box(const T* p, I i, A (&v)[4]) {
  for (int q = 0; q < 4; ++q) v[q] = ld<A>(p, I(i * 4 + q));
}

template <class E, class T, class I> __device__ __forceinline__ void box_forward(const Args& a) {
  using A = typename AccOf<T>::type;
  const E e(a);
  const I n = I(a.n);
  const T* pred = reinterpret_cast<const T*>(a.pred);
  const T* target = reinterpret_cast<const T*>(a.target);
  T* out = reinterpret_cast<T*>(a.out);
  const A lw = A(a.loss_weight);
  ShortcutAcc<A, true> sc(a);
  ThreadSum<A, true> sum;
  A& acc = sum.get();
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    A p[4], t[4], g[4], wk[4];
    load_box<A>(pred, i, p);
    load_box<A>(target, i, t);
    const A w = box_weight<A, T>(a, i, wk);
    const A l = weighted<true>(e.eval(p, t, g), w);
    if (sc.on)
      for (int q = 0; q < 4; ++q) sc.add(p[q], wk[q]);
    if (a.reduction == RED_NONE)
      out[i] = st<T>(lw * l);
    else
      acc += l;
  }
  if (a.reduction != RED_NONE) write_partials<false, true>(a, acc, A(0), sc);
}

template <class E, class T, class I> __device__ __forceinline__ void box_backward(const Args& a) {
  using A = typename AccOf<T>::type;
  const E e(a);
  const I n = I(a.n);
  const T* pred = reinterpret_cast<const T*>(a.pred);
  const T* target = reinterpret_cast<const T*>(a.target);
  const T* go = reinterpret_cast<const T*>(a.grad_out);
  T* out = reinterpret_cast<T*>(a.out);
  const A scale = A(a.loss_weight) / reduction_divisor<A>(a);
  const bool shortcut = shortcut_taken<A>(a);
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    A p[4], t[4], g[4], wk[4];
    load_box<A>(pred, i, p);
    load_box<A>(target, i, t);
    const A w = box_weight<A, T>(a, i, wk);
    const A up = ld<A>(go, I(i * I(a.g_sn)));
    if (shortcut) {
      for (int q = 0; q < 4; ++q) out[i * 4 + q] = st<T>(wk[q] * up);
      continue;
    }
    e.eval(p, t, g);
    for (int q = 0; q < 4; ++q) out[i * 4 + q] = st<T>(weighted<true>(g[q], w) * scale * up);
  }
}

// ---- Scan-row executor: a warp per row, as the row executor; the body scans its row through a
// DevScan (common.cuh, ScanRowBody). Lane l takes columns l, l + 32, ...; each reduction ends in
// a butterfly, after which every lane holds the same value (each step adds the same two values
// on both sides of a pair), so the body's branches on them stay uniform across the warp.
template <class T, class A, class I> struct DevScan {
  const T* xr;
  const T* tr;    // the dense target row (TARGET_DENSE), else null
  int64_t label;  // the class-index target (TARGET_LABELS), else -1
  int64_t c;
  T* g;  // the row's gradient (write), else null
  int lane;
  __device__ __forceinline__ A x(int64_t j) const { return ld<A>(xr, I(j)); }
  __device__ __forceinline__ A t(int64_t j) const { return ld<A>(tr, I(j)); }
  // The reductions run in f's result type R (a body may compute wider than A).
  template <class F> __device__ __forceinline__ auto sum(int64_t m, F f) const -> decltype(f(int64_t(0))) {
    using R = decltype(f(int64_t(0)));
    R v = R(0);
    for (I j = I(lane); j < I(m); j += 32) v += f(int64_t(j));
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  template <class F> __device__ __forceinline__ auto lse(int64_t m, F f, int = -1) const -> decltype(f(int64_t(0))) {
    using R = decltype(f(int64_t(0)));
    Lse<R> r{R(0), R(0)};
    for (I j = I(lane); j < I(m); j += 32) r.add(f(int64_t(j)));
    for (int o = 16; o > 0; o >>= 1) {
      const R om = __shfl_xor_sync(0xffffffffu, r.m, o), os = __shfl_xor_sync(0xffffffffu, r.s, o);
      r.merge(om, os);
    }
    return r.value();
  }
  // Recomputed: a device keeps nothing of a row but registers.
  template <class F> __device__ __forceinline__ auto softmax(int, int64_t j, F f, decltype(f(int64_t(0))) lse) const
      -> decltype(f(int64_t(0))) {
    return dl_exp(f(j) - lse);
  }
  template <class F> __device__ __forceinline__ void write(F f) const {
    for (I j = I(lane); j < I(c); j += 32) g[j] = st<T>(A(f(int64_t(j))));
  }
};

template <class T, class A, class I> __device__ __forceinline__ DevScan<T, A, I> dev_scan(const Args& a, I i, T* g) {
  const bool dense = a.target_mode == TARGET_DENSE;
  return {reinterpret_cast<const T*>(a.pred) + i * I(a.c),
          dense ? reinterpret_cast<const T*>(a.target) + i * I(a.c) : nullptr,
          dense ? int64_t(-1) : reinterpret_cast<const int64_t*>(a.target)[i],
          a.c,
          g,
          int(threadIdx.x & 31)};
}

template <class E, class T, class I> __device__ __forceinline__ void scan_forward(const Args& a) {
  using A = typename AccOf<T>::type;
  const E e(a);
  const I n = I(a.n);
  const int lane = threadIdx.x & 31;
  T* out = reinterpret_cast<T*>(a.out);
  double* stat_out = reinterpret_cast<double*>(a.row_stat);
  const A lw = A(a.loss_weight), nan = A(0) / A(0);
  A acc = A(0), valid = A(0);
  for (I i = I(blockIdx.x) * WARPS + (threadIdx.x >> 5); i < n; i += I(gridDim.x) * WARPS) {
    const DevScan<T, A, I> s = dev_scan<T, A, I>(a, i, nullptr);
    const RowCheck rc = e.check(s);
    A l = A(0);
    double stat[SCAN_STATS] = {};
    if (rc.valid && !rc.bad) l = e.forward(s, stat);
    if (lane == 0) {
      if (rc.bad) {
        l = nan;
      } else if (rc.valid) {
        l *= weight_at<A, T>(a, i, I(0));
        if (stat_out)
          for (int k = 0; k < SCAN_STATS; ++k) stat_out[int64_t(i) * SCAN_STATS + k] = stat[k];
      }
      valid += A(rc.valid);
      if (a.reduction == RED_NONE)
        out[i] = st<T>(lw * l);
      else
        acc += l;
    }
  }
  if (a.reduction != RED_NONE) write_partials<true, false, A>(a, acc, valid, ShortcutAcc<A, false>(a));
}

template <class E, class T, class I> __device__ __forceinline__ void scan_backward(const Args& a) {
  using A = typename AccOf<T>::type;
  const E e(a);
  const I c = I(a.c), n = I(a.n);
  const int lane = threadIdx.x & 31;
  const T* go = reinterpret_cast<const T*>(a.grad_out);
  const double* stat_in = reinterpret_cast<const double*>(a.row_stat);
  T* out = reinterpret_cast<T*>(a.out);
  const A scale = A(a.loss_weight) / reduction_divisor<A>(a), nan = A(0) / A(0);
  for (I i = I(blockIdx.x) * WARPS + (threadIdx.x >> 5); i < n; i += I(gridDim.x) * WARPS) {
    T* g = out + i * c;
    const DevScan<T, A, I> s = dev_scan<T, A, I>(a, i, g);
    const RowCheck rc = e.check(s);
    if (rc.bad || !rc.valid) {
      const T v = st<T>(rc.bad ? nan : A(0));
      for (I j = lane; j < c; j += 32) g[j] = v;
      continue;
    }
    const A coef = weight_at<A, T>(a, i, I(0)) * scale * ld<A>(go, I(i * I(a.g_sn)));
    e.backward(s, stat_in + int64_t(i) * SCAN_STATS, coef);
  }
}

// ---- Histogram executor, pass 1: per-block counts of the elements with weight > 0 in each bin
// (integer atomics in shared memory: exact in any order) and their total count.
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
    for (GridPos<E::MASKED_WEIGHTS, I> pos(c); pos.k < total; pos.next()) {
      const I k = pos.k, i = pos.row(), j = pos.col();
      const A w = weight_at<A, T>(a, i, j);
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
  }
}

// I: the index type. 32-bit indexing (a much cheaper division) serves whenever the element
// count allows it; the host picks the *_k64 entry points otherwise.
template <class E, class T, class I> __device__ __forceinline__ void run(int32_t pass, const Args& a) {
  if constexpr (E::SHAPE == SHAPE_ROW && E::SCAN) {
    if (pass == PASS_FORWARD)
      scan_forward<E, T, I>(a);
    else
      scan_backward<E, T, I>(a);
  } else if constexpr (E::SHAPE == SHAPE_ROW) {
    if (pass == PASS_FORWARD)
      row_forward<E, T, I>(a);
    else
      row_backward<E, T, I>(a);
  } else if constexpr (E::SHAPE == SHAPE_BOX) {
    if (pass == PASS_FORWARD)
      box_forward<E, T, I>(a);
    else
      box_backward<E, T, I>(a);
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

template <class A> __device__ __forceinline__ A slot_sum(const Args& a, int slot) {
  const A* partials = reinterpret_cast<const A*>(a.partials) + int64_t(slot) * a.n_partials;
  A s = A(0);
  for (int b = threadIdx.x; b < a.n_partials; b += THREADS) s += partials[b];
  s = block_sum(s);
  __syncthreads();
  return s;
}

template <class T> __device__ __forceinline__ void finalize(const Args& a) {
  using A = typename AccOf<T>::type;
  const A s = slot_sum<A>(a, SLOT_LOSS);
  A divisor;
  if (a.has_avg_factor == AVG_COUNT_VALID) {
    // The per-block counts are integers: summed as such, exact in any order.
    const A* counts = reinterpret_cast<const A*>(a.partials) + int64_t(SLOT_VALID) * a.n_partials;
    long long cnt = 0;
    for (int b = threadIdx.x; b < a.n_partials; b += THREADS) cnt += (long long)(counts[b]);
    cnt = block_sum(cnt);
    // The count is the divisor's avg_factor, for this pass and the backward one.
    if (threadIdx.x == 0 && a.reduction == RED_MEAN) *reinterpret_cast<A*>(a.avg_factor) = A(cnt);
    divisor = count_divisor(a, A(cnt));
  } else {
    divisor = reduction_divisor<A>(a);
  }
  A result = A(a.loss_weight) * (s / divisor);
  if (a.flags & FLAG_SHORTCUT) {
    // No weight > 0: sum(pred * weight), neither divided nor scaled; the backward pass reads the
    // decision. A sum of non-negative counts is 0 only if each is.
    const A sc = slot_sum<A>(a, SLOT_SHORTCUT);
    const A positive = slot_sum<A>(a, SLOT_POSITIVE);
    const bool taken = positive == A(0);
    if (threadIdx.x == 0) *reinterpret_cast<A*>(a.shortcut) = A(taken);
    if (taken) result = sc;
  }
  if (threadIdx.x == 0) reinterpret_cast<T*>(a.out)[0] = st<T>(result);
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
  // The total: the one given (GHM-R's), or the count of elements with weight > 0.
  long long valid = 0;
  for (int b = threadIdx.x; b < nb; b += THREADS) valid += counts[int64_t(b) * (bins + 1) + bins];
  valid = block_sum(valid);
  if (threadIdx.x == 0) {
    // Over the label weights as given, before their broadcast (MMDetection's `valid.sum()`).
    const double t = a.hist_tot ? double(*reinterpret_cast<const float*>(a.hist_tot))
                                : double(valid) / a.hist_replicas;
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
