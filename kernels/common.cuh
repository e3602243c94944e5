// Shared by every kernel body and both executors: the argument block, the portability macro
// and the numerically stable building blocks of the sigmoid-family losses.
//
// This header is compiled twice: by nvcc for the device executor (kernels.cu) and by the host
// C++ compiler for the CPU executor (host.cpp). Nothing here may depend on either side.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define DL_HD __host__ __device__ __forceinline__
#else
#define DL_HD inline __attribute__((always_inline))
#endif

#if !defined(__CUDACC__)
#include <cmath>
#endif

// Everything lives in dl::DL_ABI, an inline namespace: the host executor is compiled once per
// ISA level into one binary, and distinct mangled names keep the linker from merging the
// x86-64-v3 instantiations with the baseline ones.
#ifndef DL_ABI
#define DL_ABI device_abi
#endif
#define DL_NAMESPACE_BEGIN \
  namespace dl {           \
  inline namespace DL_ABI {
#define DL_NAMESPACE_END \
  }                      \
  }

DL_NAMESPACE_BEGIN

// The argument block: one describes one launch. Pointers are device addresses on CUDA and host
// addresses on the CPU. Its fields, in order, as X(type, name): the one definition on this side,
// from which both the struct and the layout table that the Rust side checks `DlArgs` against
// (field by field: name, offset, size; src/fused.rs) are made.
#define DL_ARGS_FIELDS(X)                                                                               \
  X(uint64_t, pred)       /* [n, c] contiguous, element type T */                                      \
  X(uint64_t, target)     /* TARGET_* below */                                                          \
  X(uint64_t, score)      /* labels + scores (QFL): [n] T */                                           \
  X(uint64_t, weight)     /* 0 or T; element (i, j) at i * w_sn + j * w_sc, w_sc in {0, 1} */         \
  X(uint64_t, avg_factor) /* 0 or [1] of the accumulation type: the divisor's avg_factor */           \
  X(uint64_t, grad_out)   /* backward: upstream gradient T at i * g_sn + j * g_sc, g_sc in {0, 1} */  \
  X(uint64_t, out)        /* forward: loss ('none') or the reduced scalar; backward: grad of pred */   \
  X(uint64_t, partials)   /* forward reductions on a device: per-block values of the accumulation type */ \
  X(uint64_t, grad_buf)   /* CPU forward: 0, or [n, c] T for d(result)/d(pred), same pass */          \
  X(uint64_t, row_stat)   /* row executor: [n] accumulation type, each row's log-sum-exp */            \
  X(uint64_t, hist_counts)  /* histogram executor: [blocks, bins + 1] int32 per-block counts */       \
  X(uint64_t, hist_weights) /* histogram executor: [2 bins + 1] accumulation type: weights, edges */  \
  X(uint64_t, hist_state)   /* histogram executor: [bins] float32 momentum state (acc_sum) or 0 */     \
  X(uint64_t, hist_tot)     /* histogram executor: 0, or [1] float32: the total as given (GHM-R) */    \
  X(uint64_t, aux)        /* a body's vector parameter, accumulation type (see the body) */            \
  X(uint64_t, shortcut)   /* FLAG_SHORTCUT: [1] accumulation type, 1 where no weight is > 0, else 0 */ \
  X(int64_t, n)                                                                                         \
  X(int64_t, c)                                                                                         \
  X(int64_t, w_sn)                                                                                      \
  X(int64_t, w_sc)                                                                                      \
  X(int64_t, g_sn)                                                                                      \
  X(int64_t, g_sc)                                                                                      \
  X(int64_t, i0)          /* a body's integer parameter (see the body) */                              \
  X(double, avg_factor_value) /* used when has_avg_factor == 1 */                                      \
  X(double, loss_weight)                                                                                \
  X(double, p0)           /* a body's parameter slots (see the body) */                               \
  X(double, p1)                                                                                         \
  X(double, p2)                                                                                         \
  X(double, p3)                                                                                         \
  X(double, momentum)     /* histogram executor: the state's momentum, 0 for none */                  \
  X(double, last_edge)    /* histogram executor: the last bin edge (float32 value) */                 \
  X(double, hist_replicas) /* histogram executor: elements per given label weight (its broadcast) */   \
  X(int32_t, flags)       /* FLAG_* below */                                                            \
  X(int32_t, target_mode)                                                                               \
  X(int32_t, reduction)                                                                                 \
  X(int32_t, has_avg_factor) /* AVG_* below */                                                         \
  X(int32_t, n_partials)                                                                                \
  X(int32_t, bins)        /* histogram executor: the number of bins */

#define DL_ARGS_MEMBER_(T, name) T name;
struct Args {
  DL_ARGS_FIELDS(DL_ARGS_MEMBER_)
};
#undef DL_ARGS_MEMBER_

// One row of the layout table: a field's name, offset and size.
struct ArgsField {
  const char* name;
  uint64_t offset, size;
};

// Flags. ACTIVATED: pred holds probabilities (focal family). IOU_WEIGHTED: VFL's option. ROW_SUM:
// the loss of a row is the sum over its elements ('none' gives [n], 'mean' divides by n). STRICT_LABELS:
// a label outside [0, C] is invalid. SIGMOID: CrossEntropyLoss's use_sigmoid. SHORTCUT:
// MMDetection's zero-weight short-cut (L1, SmoothL1, the IoU family): where no weight is > 0 the
// result is sum(pred * weight), unreduced and unscaled, and its gradient the weight. The forward
// pass decides it on the device (partial slots below) and writes the decision to `shortcut`, where
// the backward pass reads it. PLAIN_MEAN: 'mean' over the count of valid rows (AVG_COUNT_VALID)
// is torch's mean of those rows alone, the sum divided by the count without eps, and 0 for none
// (SeesawLoss's mean over its positives).
enum : int32_t {
  FLAG_ACTIVATED = 1,
  FLAG_IOU_WEIGHTED = 2,
  FLAG_ROW_SUM = 4,
  FLAG_STRICT_LABELS = 8,
  FLAG_SIGMOID = 16,
  FLAG_SHORTCUT = 64,
  FLAG_PLAIN_MEAN = 128,
};
// What `target` holds: a dense [n, c] T tensor, [n] int64 class indices (with [n] T scores in
// `score`), or one T value per row ([n], DFL's distance).
enum : int32_t { TARGET_DENSE = 0, TARGET_LABELS = 1, TARGET_LABELS_SCORES = 2, TARGET_ROW_VALUE = 3 };
enum : int32_t { RED_NONE = 0, RED_MEAN = 1, RED_SUM = 2 };
// HISTOGRAM: the histogram pre-pass of the histogram executor (per-block bin counts).
enum : int32_t { PASS_FORWARD = 0, PASS_BACKWARD = 1, PASS_HISTOGRAM = 2 };
enum : int32_t { DT_F32 = 0, DT_F64 = 1, DT_F16 = 2, DT_BF16 = 3 };
// The divisor of 'mean': the element (or row) count; avg_factor_value; the avg_factor pointer; or
// the count of valid (non-ignored) elements or rows, which the forward pass makes and writes to the
// avg_factor pointer (CrossEntropyLoss's avg_non_ignore), where the backward pass reads it.
enum : int32_t { AVG_NONE = 0, AVG_VALUE = 1, AVG_TENSOR = 2, AVG_COUNT_VALID = 3 };

// The shapes of kernel body (DESIGN.md section 9): what a body's functor sees. BOX: one box pair,
// the 4 coordinates of pred and of target (a thread per box on the device); a row-sum loss.
enum : int32_t { SHAPE_ELEMENT = 0, SHAPE_ROW = 1, SHAPE_BOX = 2 };

// The per-block partials of a forward reduction on a device, in slots of n_partials values: the
// loss sum; the count of valid elements (AVG_COUNT_VALID); and for FLAG_SHORTCUT the sum of
// pred * weight over the elements with a non-zero weight and the count of weights > 0.
enum : int32_t { SLOT_LOSS = 0, SLOT_VALID = 1, SLOT_SHORTCUT = 2, SLOT_POSITIVE = 3 };

// Histogram bins beyond this are rejected by the Rust side (the pre-pass counts in shared memory).
constexpr int MAX_BINS = 1024;

// torch.finfo(torch.float32).eps, which MMDetection adds to avg_factor whatever the dtype.
constexpr double AVG_FACTOR_EPS = 1.1920928955078125e-07;

// The divisor of the reduction, as MMDetection's weight_reduce_loss: avg_factor + eps (the
// avg_factor tensor is read where the kernel runs), else the element count (per anchor for
// row-sum losses) for a plain mean, and 1 for 'sum' and 'none'.
template <class A> DL_HD A count_divisor(const Args& a, A count) {
  if (a.flags & FLAG_PLAIN_MEAN) return count > A(0) ? count : A(1);  // the sum is 0 without rows
  return count + A(AVG_FACTOR_EPS);
}
template <class A> DL_HD A reduction_divisor(const Args& a) {
  if (a.reduction != RED_MEAN) return A(1);
  if (a.has_avg_factor == AVG_VALUE) return A(a.avg_factor_value + AVG_FACTOR_EPS);
  // AVG_COUNT_VALID: the count is in place by the time a pass reads it (see the executors).
  if (a.has_avg_factor == AVG_COUNT_VALID) return count_divisor(a, *reinterpret_cast<const A*>(a.avg_factor));
  if (a.has_avg_factor == AVG_TENSOR) return *reinterpret_cast<const A*>(a.avg_factor) + A(AVG_FACTOR_EPS);
  return A((a.flags & FLAG_ROW_SUM) ? a.n : a.n * a.c);
}

// The math functions, named once so that each executor can pick the vectorizable or the
// device overloads (the host build declares the glibc vector variants for float and double).
DL_HD float dl_exp(float x) { return expf(x); }
DL_HD double dl_exp(double x) { return exp(x); }
DL_HD float dl_log(float x) { return logf(x); }
DL_HD double dl_log(double x) { return log(x); }
// log1p through log: log(u) * x / (u - 1) with u = 1 + x is accurate to a few ulps (Goldberg)
// and vectorizes with the vector log, where glibc's vector log1p falls back to scalar calls.
template <class A> DL_HD A dl_log1p_via_log(A x) {
  const A u = A(1) + x;
  return u == A(1) ? x : dl_log(u) * (x / (u - A(1)));
}
DL_HD float dl_log1p(float x) { return dl_log1p_via_log(x); }
DL_HD double dl_log1p(double x) { return dl_log1p_via_log(x); }
#if defined(__CUDA_ARCH__)
// libdevice's pow is a large out-of-line routine that spills; the bases here are >= 0 (|d|, pt),
// so exp2(y log2 x), with torch's 0^0 = 1 and 0^y = 0 for y > 0, serves.
DL_HD float dl_pow(float x, float y) { return x == 0.f ? (y == 0.f ? 1.f : 0.f) : exp2f(y * log2f(x)); }
DL_HD double dl_pow(double x, double y) { return x == 0.0 ? (y == 0.0 ? 1.0 : 0.0) : exp2(y * log2(x)); }
#else
DL_HD float dl_pow(float x, float y) { return powf(x, y); }
DL_HD double dl_pow(double x, double y) { return pow(x, y); }
#endif

DL_HD float dl_sqrt(float x) { return sqrtf(x); }
DL_HD double dl_sqrt(double x) { return sqrt(x); }
// torch's pow(tensor, scalar exponent): its exact special cases (0, 1, 0.5, 2, 3, -0.5, -1, -2),
// else pow() with the exponent in the tensor's type.
template <class A> DL_HD A torch_pow(A x, A e) {
  if (e == A(0)) return A(1);
  if (e == A(1)) return x;
  if (e == A(0.5)) return dl_sqrt(x);
  if (e == A(2)) return x * x;
  if (e == A(3)) return x * x * x;
  if (e == A(-0.5)) return A(1) / dl_sqrt(x);
  if (e == A(-1)) return A(1) / x;
  if (e == A(-2)) return A(1) / (x * x);
  return dl_pow(x, e);
}
DL_HD float dl_atan(float x) { return atanf(x); }
DL_HD double dl_atan(double x) { return atan(x); }
DL_HD float dl_asin(float x) { return asinf(x); }
DL_HD double dl_asin(double x) { return asin(x); }
DL_HD float dl_sin(float x) { return sinf(x); }
DL_HD double dl_sin(double x) { return sin(x); }
DL_HD float dl_cos(float x) { return cosf(x); }
DL_HD double dl_cos(double x) { return cos(x); }

template <class A> DL_HD A dl_min(A a, A b) { return a < b ? a : b; }
template <class A> DL_HD A dl_max(A a, A b) { return a > b ? a : b; }
template <class A> DL_HD A dl_abs(A a) { return a < A(0) ? -a : a; }
// torch.sign: 0 at 0, so |d| has gradient 0 there, as in autograd.
template <class A> DL_HD A dl_sign(A a) { return A((a > A(0)) - (a < A(0))); }

// Expands RUN(F<A, true>) when the exponent (p0) is exactly 2 (the default of every loss here),
// RUN(F<A, false>) otherwise.
#define DL_POW2(a, F, A, RUN) ((a).p0 == 2.0 ? RUN(F<A, true>) : RUN(F<A, false>))

// x^y for the exponents of the loss definitions. POW2 is the default exponent (2.0), done with a
// multiplication; the general path is pow(), whose 0^0 = 1 matches torch.
template <bool POW2, class A> DL_HD A dl_powe(A x, A y) {
  if (POW2) return x * x;
  return dl_pow(x, y);
}
// d/dx x^y = y * x^(y-1); torch's pow backward is exactly 0 when y == 0.
template <bool POW2, class A> DL_HD A dl_dpowe(A x, A y) {
  if (POW2) return A(2) * x;
  return y == A(0) ? A(0) : y * dl_pow(x, y - A(1));
}

// The sigmoid of a logit and BCE-with-logits, stable for every finite x: exp() only ever sees
// -|x|, and log(sigmoid) is taken through log1p. The BCE form is torch's
// (1 - t) x - log_sigmoid(x), with log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)).
template <class A> struct Logit {
  A p;    // sigmoid(x)
  A bce;  // binary_cross_entropy_with_logits(x, t)
  DL_HD Logit(A x, A t) {
    A e = dl_exp(-dl_abs(x));
    A r = A(1) / (A(1) + e);
    p = x >= A(0) ? r : e * r;
    bce = (A(1) - t) * x - dl_min(x, A(0)) + dl_log1p(e);
  }
};

// F.binary_cross_entropy on a probability, with torch's clamp of each log term at -100 and its
// gradient (p - t) / max(p (1 - p), 1e-12).
template <class A> DL_HD A bce_prob(A p, A t) {
  return (t - A(1)) * dl_max(dl_log1p(-p), A(-100)) - t * dl_max(dl_log(p), A(-100));
}
template <class A> DL_HD A bce_prob_grad(A p, A t) {
  return (p - t) / dl_max((A(1) - p) * p, A(1e-12));
}

// v where p is a probability, NaN where it is not (outside [0, 1], or NaN): the activated losses'
// documented result on CUDA, where reporting it would need a host read (the CPU rejects it first).
template <class A> DL_HD A prob_guard(A p, A v) { return (p >= A(0) && p <= A(1)) ? v : A(0) / A(0); }

// What a body's functor declares about itself. An element functor derives from ElementBody and
// has `A loss(A x, A t)` and `A grad(A x, A t)` (d loss / d x); the executors read these traits:
//   LABEL_TARGETS    class-index targets besides dense ones;
//   ELEMENT_WEIGHTS  per-element weights and upstream gradients besides per-row ones;
//   COLUMN_PARAM     loss and grad take a third argument, `aux[j]` (a per-class parameter; 1
//                    where aux is 0);
//   IGNORE_INDEX     a label (or dense target value) that is negative or equals i0 is ignored:
//                    weight 0, and not counted as valid;
//   HISTOGRAM        the histogram executor: `A hist_g(A x, A t)` places an element in a bin and
//                    the element's weight becomes its bin's weight where its weight is > 0;
//   MASKED_WEIGHTS   an element (or box) whose weight is 0 contributes exactly 0 to the loss and
//                    the gradient, whatever its values (no 0 * NaN: a box loss over all anchors
//                    with zero weights for the negatives); the zero-weight short-cut
//                    (FLAG_SHORTCUT) is compiled in.
// A row functor derives from RowBody and has `SparseTarget<A> target(int64_t label, A value)`: the
// row executor computes the cross-entropy of the row's softmax against that target. A scan-row
// functor derives from ScanRowBody instead, for a row loss that needs more of its row than that
// (a dense target row, logits re-weighted from the row's own softmax): the executor hands it a
// scan `s` of the row, a loop on the CPU and the row's warp on a device, with
//   s.x(j), s.t(j)   pred and the dense target at column j (accumulation type); s.label, the
//                    class-index target; s.c, the row length;
//   s.sum(m, f), s.lse(m, f[, slot])  the sum and the log-sum-exp of f(j) over the row's first m
//                    columns: every thread of the row gets the same value, so a body branches on
//                    them freely;
//   s.softmax(slot, j, f, lse)  exp(f(j) - lse) for the lse that lse(m, f, slot) gave: on the CPU
//                    from what that call kept in the slot (no exp), on a device recomputed;
//   s.write(f)       the row's gradient, g[j] = f(j);
// and the functor has
//   RowCheck check(const S& s)                   whether the row counts and whether its target is bad;
//   A forward(const S& s, double* stat)          the row's loss, unweighted, leaving SCAN_STATS values
//                                                in stat for the backward pass;
//   void backward(const S& s, const double* stat, A coef)  s.write(coef * d loss / d x_j).
// The reductions run in the type f returns, so a body may compute wider than A.
// A box functor derives from BoxBody and has `A eval(const A (&p)[4], const A (&t)[4], A (&g)[4])`:
// the loss of one xyxy box pair, writing its gradient with respect to p to g (box.cuh).
struct ElementBody {
  static constexpr int SHAPE = SHAPE_ELEMENT;
  static constexpr bool LABEL_TARGETS = false, ELEMENT_WEIGHTS = true, COLUMN_PARAM = false,
                        IGNORE_INDEX = false, HISTOGRAM = false, MASKED_WEIGHTS = false, SCAN = false;
};
struct RowBody {
  static constexpr int SHAPE = SHAPE_ROW;
  static constexpr bool LABEL_TARGETS = true, ELEMENT_WEIGHTS = false, COLUMN_PARAM = false,
                        IGNORE_INDEX = false, HISTOGRAM = false, MASKED_WEIGHTS = false, SCAN = false;
};
struct ScanRowBody : RowBody {
  static constexpr bool SCAN = true;
};
// The values per row a scan-row body keeps from its forward pass for the backward pass: doubles,
// so that a body computing in double keeps its precision (the row_stat buffer is float64, this
// many per row, for every row body; the row executor's log-sum-exps take its first n values of A).
constexpr int SCAN_STATS = 2;
// The softmax slots of a scan (s.lse(.., slot), s.softmax).
constexpr int SCAN_SLOTS = 2;
// A scan row's standing: `valid` false leaves it out (loss 0, not counted), `bad` marks its target
// out of range (an error on the CPU, NaN on a device).
struct RowCheck {
  bool valid, bad;
};
struct BoxBody {
  static constexpr int SHAPE = SHAPE_BOX;
  static constexpr bool LABEL_TARGETS = false, ELEMENT_WEIGHTS = true, COLUMN_PARAM = false,
                        IGNORE_INDEX = false, HISTOGRAM = false, MASKED_WEIGHTS = true, SCAN = false;
};

// v * w, or exactly 0 where a MASKED_WEIGHTS body's weight is 0.
template <bool MASKED, class A> DL_HD A weighted(A v, A w) {
  if (MASKED) return w == A(0) ? A(0) : v * w;
  return v * w;
}

// A row's target distribution with at most two non-zero entries: coef[k] at column idx[k] (a
// coefficient of 0 leaves idx[k] unread). The row's loss is sum_k coef[k] (lse - x[idx[k]]) and
// its gradient softmax(x) sum_k coef[k] - coef[k] at idx[k]. `valid` false: the row is ignored
// (loss 0, not counted); `bad`: the target is out of range (an error on the CPU, NaN on a device).
template <class A> struct SparseTarget {
  int64_t idx[2];
  A coef[2];
  bool valid, bad;
};

// Online log-sum-exp: the running maximum and the sum of exp(x - m). Empty: {0, 0}.
template <class A> struct Lse {
  A m, s;
  DL_HD void add(A v) {
    if (s == A(0)) {
      m = v;
      s = A(1);
    } else if (v > m) {
      s = s * dl_exp(m - v) + A(1);
      m = v;
    } else {
      s += dl_exp(v - m);
    }
  }
  DL_HD void merge(A om, A os) {
    if (os == A(0)) return;
    if (s == A(0)) {
      m = om;
      s = os;
      return;
    }
    const A mm = dl_max(m, om);
    s = s * dl_exp(m - mm) + os * dl_exp(om - mm);
    m = mm;
  }
  DL_HD A value() const { return m + dl_log(s); }
};

// The histogram executor's bin of g: bin i holds edges[i] <= g < edges[i + 1], with MMDetection's
// float32 edges float(i) / float(bins) (`edge(i)`, computed or looked up by the executor) and the
// last one `last` (GHM-C: float32(1) + 1e-6, GHM-R: 1e3). Compared against the edges, not
// floor(g * bins) alone, which misplaces values next to an edge; that floor is off by at most one
// bin, so one step each way finds the bin. -1 for a g in no bin (NaN included).
template <class A> DL_HD A hist_edge(int k, int bins) { return A(float(k) / float(bins)); }
template <class A, class Edge> DL_HD int hist_bin(A g, int bins, A last, const Edge& edge) {
  // Selects rather than branches, so that a CPU loop over elements vectorizes.
  const bool in = (g >= A(0)) & (g < last);
  const A gg = in ? g : A(0);
  const A scaled = gg * A(bins);
  int k = scaled >= A(bins - 1) ? bins - 1 : int(scaled);
  k -= ((k > 0) & (gg < edge(k))) ? 1 : 0;
  k += ((k < bins - 1) & (gg >= edge(k + 1))) ? 1 : 0;
  return in ? k : -1;
}

// A float32 product rounded on its own. Compilers contract `a * b + c` into one fma by default
// (GCC's -ffp-contract=fast on FMA targets, nvcc's --fmad=true), which skips the rounding of the
// product that torch's separate `mul` and `add` keep; a volatile store (host) or __fmul_rn
// (device) is never contracted.
DL_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;
  return p;
#endif
}

// The weight of a bin with `num` elements (before the division by the number of non-empty bins),
// updating the float32 momentum state as MMDetection does, in float32: acc = m acc + (1 - m) num,
// weight = float32(1 / acc) * float32(tot) (torch's `tot / acc_sum[i]`). Without momentum,
// tot / num in double (Python's), then in the accumulation type.
template <class A> DL_HD A hist_bin_weight(float* state, int b, int64_t num, double tot, double momentum) {
  if (num == 0) return A(0);
  if (momentum > 0 && state) {
    // MMDetection's `mmt * acc_sum[i] + (1 - mmt) * num_in_bin` on a float32 buffer: two float32
    // ops, each with its Python float rounded to float32 first.
    const float acc = mul_rn(float(momentum), state[b]) + float((1.0 - momentum) * double(num));
    state[b] = acc;
    return A((1.0f / acc) * float(tot));
  }
  return A(tot / double(num));
}

DL_NAMESPACE_END
