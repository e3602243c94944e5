// The CPU executor: walks rows of [n, c] in fixed chunks over libtorch's intra-op thread pool and
// applies a loss's functor (focal.cuh, ...) to each element (element bodies), or to each row (row
// bodies), after a histogram pre-pass over the same chunks for histogram bodies (GHM). Compiled by build.rs once
// for x86-64-v3 (AVX2/FMA, with glibc's vector math) and once for the baseline ISA; the Rust side
// picks one at run time.
//
// Determinism: chunk boundaries depend only on the shape (never on the thread count), each chunk
// sums its rows in a fixed order, and the chunk partials are added in order. The same inputs give
// bitwise the same loss for any number of threads.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common.cuh"

DL_NAMESPACE_BEGIN
namespace host {

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Elements per chunk: large enough to amortize the pool, small enough to balance two cores.
constexpr int64_t CHUNK_ELEMS = 1 << 15;
// Columns are processed in blocks so that the per-element losses stay in L1 for the lane sum.
constexpr int64_t BLOCK = 256;

template <class T, class A> inline A ld(const T* p, int64_t k) { return static_cast<A>(p[k]); }

// Sums a block in 8 fixed lanes: vectorizes without reassociating across calls.
template <class A> inline A lane_sum(const A* buf, int64_t m) {
  A lanes[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t k = 0;
  for (; k + 8 <= m; k += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += buf[k + l];
  A tail = A(0);
  for (; k < m; ++k) tail += buf[k];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) +
         tail;
}

// One row's view of the target and weight.
template <class T, class A> struct Row {
  const T* x;
  const T* tgt;  // dense target row
  int64_t label;  // class index of the positive, or -1 / c for none
  A score;        // its target value (1 for plain labels)
  const T* w;     // element weights of the row (WELEM)
  A wr;           // the row's scalar weight (1 without weight)
  A valid;        // 0 for a row an IGNORE_INDEX body ignores, else 1
};

template <class T, class A, int TM>
inline A target_at(const Row<T, A>& r, int64_t j) {
  if (TM == TARGET_DENSE) return ld<T, A>(r.tgt, j);
  return j == r.label ? r.score : A(0);
}

template <class T, class A> struct Launch {
  const Args& a;
  const T* pred;
  const T* target;
  const int64_t* labels;
  const T* score;
  const T* weight;
  int64_t n, c;
  bool strict;
  bool row_sum;
  int64_t rows_per_chunk, n_chunks;
  // Loop invariants, hoisted so that the element loops vectorize: the per-class parameters (a
  // column of ones without them), the ignored label value, and the histogram's bins.
  std::vector<A> ones;
  const A* col;
  A ignore;
  const A* bin_weight;
  int bins;
  A last_edge;

  explicit Launch(const Args& args)
      : a(args),
        pred(reinterpret_cast<const T*>(args.pred)),
        target(reinterpret_cast<const T*>(args.target)),
        labels(reinterpret_cast<const int64_t*>(args.target)),
        score(reinterpret_cast<const T*>(args.score)),
        weight(reinterpret_cast<const T*>(args.weight)),
        n(args.n),
        c(args.c),
        strict((args.flags & FLAG_STRICT_LABELS) != 0),
        row_sum((args.flags & FLAG_ROW_SUM) != 0),
        rows_per_chunk(std::max<int64_t>(1, CHUNK_ELEMS / std::max<int64_t>(c, 1))),
        n_chunks((n + rows_per_chunk - 1) / rows_per_chunk),
        ones(args.aux ? 0 : size_t(std::max<int64_t>(c, 0)), A(1)),
        col(args.aux ? reinterpret_cast<const A*>(args.aux) : ones.data()),
        ignore(A(args.i0)),
        bin_weight(reinterpret_cast<const A*>(args.hist_weights)),
        bins(args.bins),
        last_edge(A(args.last_edge)) {}

  // The bin of g (-1 for none). The edges are divided out rather than looked up: a division
  // vectorizes where a table lookup does not.
  DL_HD int bin(A g) const {
    const int nb = bins;
    return hist_bin(g, nb, last_edge, [nb](int k) { return hist_edge<A>(k, nb); });
  }

  // The slots of a histogram body's elements j0 .. j0 + m of a row: their bin, `none` where
  // they are in no bin and `skip` where their weight is not > 0. Two loops: the gradient norms
  // (the exp and the division, which vectorize), then the bins from them.
  template <class E, int TM, bool WELEM>
  DL_HD void hist_slots(const E& e, const Row<T, A>& r, int64_t j0, int64_t m, A* g, int32_t* slot, int32_t none,
                        int32_t skip) const {
    // The label's column relative to the block, in 32 bits: a 64-bit compare in the loop keeps it
    // from vectorizing.
    const int32_t lab = (r.label >= j0 && r.label < j0 + m) ? int32_t(r.label - j0) : -1;
    for (int32_t k = 0; k < int32_t(m); ++k) {
      const A t = TM == TARGET_DENSE ? ld<T, A>(r.tgt, j0 + k) : (k == lab ? r.score : A(0));
      g[k] = e.hist_g(ld<T, A>(r.x, j0 + k), t);
    }
    for (int64_t k = 0; k < m; ++k) {
      const A w = WELEM ? ld<T, A>(r.w, j0 + k) : r.wr;
      const int b = bin(g[k]);
      slot[k] = !(w > A(0)) ? skip : (b < 0 ? none : b);
    }
  }

  // The weights of a histogram body's elements j0 .. j0 + m of a row, by their slots.
  template <class E, int TM, bool WELEM>
  DL_HD void hist_weights(const E& e, const Row<T, A>& r, int64_t j0, int64_t m, A* g, int32_t* slot, A* w) const {
    hist_slots<E, TM, WELEM>(e, r, j0, m, g, slot, -1, -1);
    for (int64_t k = 0; k < m; ++k) w[k] = slot[k] >= 0 ? bin_weight[slot[k]] : A(0);
  }

  // Element (i, j)'s weight: its weight (per element or per row), 0 where an IGNORE_INDEX body
  // ignores it, and for a histogram body its bin's weight where its weight is > 0.
  template <class E, int TM, bool WELEM> DL_HD A weight_of(const E& e, const Row<T, A>& r, int64_t j, A x, A t) const {
    A w = WELEM ? ld<T, A>(r.w, j) : r.wr;
    if constexpr (E::IGNORE_INDEX) {
      w *= r.valid;
      if (TM == TARGET_DENSE) w = (t >= A(0) && t != ignore) ? w : A(0);
    }
    if constexpr (E::HISTOGRAM) {
      const int b = bin(e.hist_g(x, t));
      w = (w > A(0)) & (b >= 0) ? bin_weight[b >= 0 ? b : 0] : A(0);
    }
    return w;
  }
  // Column j's parameter (aux[j], or 1) for a COLUMN_PARAM body.
  template <class E> DL_HD A column_param(int64_t j) const {
    if constexpr (E::COLUMN_PARAM) return col[j];
    return A(1);
  }

  // The rows of chunk ch: [chunk_begin(ch), chunk_end(ch)).
  int64_t chunk_begin(int64_t ch) const { return ch * rows_per_chunk; }
  int64_t chunk_end(int64_t ch) const { return std::min(n, (ch + 1) * rows_per_chunk); }

  // Fills r for row i; returns false for a label outside the valid range (strict mode).
  template <int TM, bool IGNORE = false> bool row(int64_t i, Row<T, A>& r) const {
    r.x = pred + i * c;
    r.tgt = target + i * c;
    r.w = weight ? weight + i * a.w_sn : nullptr;
    r.wr = (weight && a.w_sc == 0) ? ld<T, A>(weight, i * a.w_sn) : A(1);
    r.label = -1;
    r.score = A(1);
    r.valid = A(1);
    bool ok = true;
    if (TM != TARGET_DENSE) {
      int64_t l = labels[i];
      if (IGNORE && (l < 0 || l == a.i0)) {
        r.valid = A(0);
        return true;
      }
      if (strict) {
        ok = l >= 0 && l <= c;  // c is the background class
        r.label = ok ? l : -1;
      } else {
        r.label = (l >= 0 && l < c) ? l : -1;  // MMDetection's QFL: anything else is negative
      }
      if (score) r.score = ld<T, A>(score, i);
    }
    return ok;
  }
};

// The zero-weight short-cut's per-chunk values (FLAG_SHORTCUT): the sum of pred * weight over the
// elements with a non-zero weight and the count of weights > 0.
struct ShortcutParts {
  std::vector<double> sum;
  std::vector<int64_t> positive;
  explicit ShortcutParts(int64_t chunks) : sum(size_t(chunks), 0.0), positive(size_t(chunks), 0) {}
};

// The end of every forward pass on the CPU, one reduction step for all shapes: the chunks'
// partial sums added in order, divided and scaled by loss_weight into out[0] for a reduction, or,
// where the short-cut applies and no weight is > 0, sum(pred * weight) (the decision is written
// to `shortcut` for the backward pass and returned in `taken`); returns the count of invalid
// targets the chunks found.
template <class T, class A>
int64_t finish_forward(const Args& args, const std::vector<double>& partial, const std::vector<int64_t>& invalid,
                       const ShortcutParts* sc = nullptr, bool* taken = nullptr) {
  int64_t bad = 0;
  for (int64_t v : invalid) bad += v;
  if (args.reduction != RED_NONE) {
    double total = 0.0;
    for (double v : partial) total += v;
    T result = static_cast<T>(A(double(A(args.loss_weight)) * (total / double(reduction_divisor<A>(args)))));
    if (sc && (args.flags & FLAG_SHORTCUT)) {
      int64_t positive = 0;
      double sum = 0.0;
      for (size_t k = 0; k < sc->sum.size(); ++k) {
        positive += sc->positive[k];
        sum += sc->sum[k];
      }
      *taken = positive == 0;
      *reinterpret_cast<A*>(args.shortcut) = A(*taken);
      if (*taken) result = static_cast<T>(A(sum));
    }
    reinterpret_cast<T*>(args.out)[0] = result;
  }
  return bad;
}

// Always inlined, as the functors are: a call per element would stop the loops vectorizing.
template <class E, class A> DL_HD A elem_loss(const E& e, A x, A t, A cp) {
  if constexpr (E::COLUMN_PARAM) return e.loss(x, t, cp);
  else return e.loss(x, t);
}
template <class E, class A> DL_HD A elem_grad(const E& e, A x, A t, A cp) {
  if constexpr (E::COLUMN_PARAM) return e.grad(x, t, cp);
  else return e.grad(x, t);
}

// WG: also write the gradient of the result with respect to pred (grad_buf), sharing the
// element math with the loss; the backward pass then only scales it by the upstream gradient.
template <class E, class T, int TM, bool WELEM, bool WG>
int64_t forward(const Args& args) {
  using A = typename AccOf<T>::type;
  Launch<T, A> L(args);
  const E e(args);
  const int64_t c = L.c;
  const bool row_sum = L.row_sum;
  const A lw = A(args.loss_weight);
  T* out = reinterpret_cast<T*>(args.out);
  T* grad = reinterpret_cast<T*>(args.grad_buf);
  const A gscale = lw / reduction_divisor<A>(args);
  std::vector<double> partial(L.n_chunks, 0.0);
  std::vector<int64_t> invalid(L.n_chunks, 0);
  constexpr bool MASKED = E::MASKED_WEIGHTS;
  const bool shortcut = MASKED && (args.flags & FLAG_SHORTCUT) && args.reduction != RED_NONE;
  ShortcutParts sc(shortcut ? L.n_chunks : 0);

  at::parallel_for(0, L.n_chunks, 1, [&](int64_t cb, int64_t ce) {
    alignas(64) A buf[BLOCK];
    // For histogram bodies the element loop stores the gradient here, not through grad: with the
    // bin weights' `w > 0` test, a store through grad (which could alias the body's parameters)
    // makes GCC sink the loads into a branch, and the loop does not vectorize. Other bodies store
    // through grad: with the buffer GCC predicates their math calls (BalancedL1's log), which
    // does not vectorize either.
    constexpr bool GRAD_BUF = WG && E::HISTOGRAM;
    alignas(64) A gb[GRAD_BUF ? BLOCK : 1];
    alignas(64) A hw[E::HISTOGRAM ? BLOCK : 1];
    alignas(64) A hg[E::HISTOGRAM ? BLOCK : 1];
    alignas(64) int32_t slot[E::HISTOGRAM ? BLOCK : 1];
    for (int64_t ch = cb; ch < ce; ++ch) {
      double acc = 0.0;
      for (int64_t i = L.chunk_begin(ch); i < L.chunk_end(ch); ++i) {
        Row<T, A> r;
        if (!L.template row<TM, E::IGNORE_INDEX>(i, r)) invalid[ch]++;
        A row_total = A(0);
        for (int64_t j0 = 0; j0 < c; j0 += BLOCK) {
          const int64_t m = std::min(BLOCK, c - j0);
          const T* x = r.x + j0;
          T* g = WG ? grad + i * c + j0 : nullptr;
          if constexpr (E::HISTOGRAM) L.template hist_weights<E, TM, WELEM>(e, r, j0, m, hg, slot, hw);
          for (int64_t k = 0; k < m; ++k) {
            const A xk = ld<T, A>(x, k), tk = target_at<T, A, TM>(r, j0 + k);
            A w;
            if constexpr (E::HISTOGRAM) w = hw[k];
            else w = L.template weight_of<E, TM, WELEM>(e, r, j0 + k, xk, tk);
            const A cp = L.template column_param<E>(j0 + k);
            buf[k] = weighted<MASKED>(elem_loss(e, xk, tk, cp), w);
            if constexpr (GRAD_BUF) gb[k] = weighted<MASKED>(elem_grad(e, xk, tk, cp), w) * gscale;
            else if (WG) g[k] = static_cast<T>(weighted<MASKED>(elem_grad(e, xk, tk, cp), w) * gscale);
          }
          if constexpr (GRAD_BUF)
            for (int64_t k = 0; k < m; ++k) g[k] = static_cast<T>(gb[k]);
          if constexpr (MASKED) {
            // Apart from the loop above, which it would keep from vectorizing.
            if (shortcut)
              for (int64_t k = 0; k < m; ++k) {
                const A w = WELEM ? ld<T, A>(r.w, j0 + k) : r.wr;
                sc.sum[ch] += double(weighted<true>(ld<T, A>(x, k), w));
                sc.positive[ch] += w > A(0);
              }
          }
          if (args.reduction == RED_NONE && !row_sum) {
            T* o = out + i * c + j0;
            for (int64_t k = 0; k < m; ++k) o[k] = static_cast<T>(lw * buf[k]);
          } else {
            row_total += lane_sum(buf, m);
          }
        }
        if (args.reduction == RED_NONE) {
          if (row_sum) out[i] = static_cast<T>(lw * row_total);
        } else {
          acc += double(row_total);
        }
      }
      partial[ch] = acc;
    }
  });

  bool taken = false;
  const int64_t bad = finish_forward<T, A>(args, partial, invalid, &sc, &taken);
  if (WG && taken) {
    // The short-cut's gradient, d sum(pred * weight) / d pred: the weight (a rare second pass).
    for (int64_t i = 0; i < L.n; ++i) {
      Row<T, A> r;
      L.template row<TM>(i, r);
      for (int64_t j = 0; j < c; ++j) grad[i * c + j] = static_cast<T>(WELEM ? ld<T, A>(r.w, j) : r.wr);
    }
  }
  return bad;
}

template <class E, class T, int TM, bool WELEM, bool GELEM>
int64_t backward(const Args& args) {
  using A = typename AccOf<T>::type;
  Launch<T, A> L(args);
  const E e(args);
  const int64_t c = L.c;
  const T* go = reinterpret_cast<const T*>(args.grad_out);
  T* out = reinterpret_cast<T*>(args.out);
  const A scale = A(args.loss_weight) / reduction_divisor<A>(args);
  std::vector<int64_t> invalid(L.n_chunks, 0);
  // The short-cut's gradient is the weight (MASKED_WEIGHTS bodies).
  const bool shortcut = E::MASKED_WEIGHTS && (args.flags & FLAG_SHORTCUT) && *reinterpret_cast<const A*>(args.shortcut) != A(0);

  at::parallel_for(0, L.n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      for (int64_t i = L.chunk_begin(ch); i < L.chunk_end(ch); ++i) {
        Row<T, A> r;
        if (!L.template row<TM, E::IGNORE_INDEX>(i, r)) invalid[ch]++;
        const T* gr = go + i * args.g_sn;
        const A up = GELEM ? A(1) : ld<T, A>(gr, 0);
        const A rs = scale * up;
        T* o = out + i * c;
        if (shortcut) {
          for (int64_t j = 0; j < c; ++j) o[j] = static_cast<T>((WELEM ? ld<T, A>(r.w, j) : r.wr) * up);
          continue;
        }
        for (int64_t j = 0; j < c; ++j) {
          const A xj = ld<T, A>(r.x, j), tj = target_at<T, A, TM>(r, j);
          A g = weighted<E::MASKED_WEIGHTS>(elem_grad(e, xj, tj, L.template column_param<E>(j)),
                                            L.template weight_of<E, TM, WELEM>(e, r, j, xj, tj)) *
                rs;
          if (GELEM) g *= ld<T, A>(gr, j);
          o[j] = static_cast<T>(g);
        }
      }
    }
  });
  int64_t bad = 0;
  for (int64_t v : invalid) bad += v;
  return bad;
}

// What the forward pass needs before its first element: the count of valid elements as the
// divisor (AVG_COUNT_VALID; written to avg_factor, where the backward pass reads it too), and for
// a histogram body the bin weights and the total (the histogram executor's pre-pass and finalize).
template <class E, class T, int TM, bool WELEM> void prepare(const Args& args) {
  using A = typename AccOf<T>::type;
  Launch<T, A> L(args);
  const E e(args);
  const int64_t c = L.c;
  if (args.has_avg_factor == AVG_COUNT_VALID && args.reduction == RED_MEAN) {
    int64_t count = 0;
    for (int64_t i = 0; i < L.n; ++i) {
      Row<T, A> r;
      L.template row<TM, E::IGNORE_INDEX>(i, r);
      if (TM == TARGET_DENSE && E::IGNORE_INDEX) {
        for (int64_t j = 0; j < c; ++j) {
          const A t = ld<T, A>(r.tgt, j);
          count += t >= A(0) && t != A(args.i0);
        }
      } else {
        count += r.valid != A(0) ? c : 0;
      }
    }
    *reinterpret_cast<A*>(args.avg_factor) = A(count);
  }
  if constexpr (E::HISTOGRAM) {
    const int bins = args.bins;
    // Pass 1: per-chunk counts of the elements with weight > 0 in each bin and their count;
    // pass 2: the chunks added in order, the state updated, the bin weights written.
    std::vector<int64_t> counts(size_t(L.n_chunks) * (bins + 1), 0);
    at::parallel_for(0, L.n_chunks, 1, [&](int64_t cb, int64_t ce) {
      // Per block of a row: the slots in a vector loop (bins: no bin; bins + 1: weight not
      // > 0), then the counts in a scalar one.
      alignas(64) int32_t slot[BLOCK];
      alignas(64) A gbuf[BLOCK];
      std::vector<int64_t> local(size_t(bins) + 2);
      for (int64_t ch = cb; ch < ce; ++ch) {
        std::fill(local.begin(), local.end(), 0);
        for (int64_t i = L.chunk_begin(ch); i < L.chunk_end(ch); ++i) {
          Row<T, A> r;
          L.template row<TM>(i, r);
          for (int64_t j0 = 0; j0 < c; j0 += BLOCK) {
            const int64_t m = std::min(BLOCK, c - j0);
            L.template hist_slots<E, TM, WELEM>(e, r, j0, m, gbuf, slot, bins, bins + 1);
            for (int64_t k = 0; k < m; ++k) local[slot[k]]++;
          }
        }
        int64_t* cnt = counts.data() + ch * (bins + 1);
        for (int b = 0; b < bins; ++b) cnt[b] = local[b];
        cnt[bins] = std::accumulate(local.begin(), local.begin() + bins + 1, int64_t(0));
      }
    });
    int64_t valid = 0;
    for (int64_t ch = 0; ch < L.n_chunks; ++ch) valid += counts[size_t(ch) * (bins + 1) + bins];
    // The total given (GHM-R's), or the count over the label weights as given, before their
    // broadcast (MMDetection's `valid.sum()`).
    const double t = args.hist_tot ? double(*reinterpret_cast<const float*>(args.hist_tot))
                                   : double(valid) / args.hist_replicas;
    const double tot = t > 1.0 ? t : 1.0;
    A* weights = reinterpret_cast<A*>(args.hist_weights);
    float* state = reinterpret_cast<float*>(args.hist_state);
    int nonempty = 0;
    for (int b = 0; b < bins; ++b) {
      int64_t num = 0;
      for (int64_t ch = 0; ch < L.n_chunks; ++ch) num += counts[size_t(ch) * (bins + 1) + b];
      weights[b] = hist_bin_weight<A>(state, b, num, tot, args.momentum);
      nonempty += num > 0;
    }
    if (nonempty > 0)
      for (int b = 0; b < bins; ++b) weights[b] = weights[b] / A(nonempty);
    *reinterpret_cast<A*>(args.avg_factor) = A(tot);
  }
}

// ---- Row bodies: the softmax cross-entropy of each row against the body's SparseTarget.
template <class E, class T, class A> inline SparseTarget<A> row_target(const E& e, const Args& a, int64_t i) {
  if (a.target_mode == TARGET_ROW_VALUE) return e.target(0, ld<T, A>(reinterpret_cast<const T*>(a.target), i));
  return e.target(reinterpret_cast<const int64_t*>(a.target)[i], A(0));
}

// A row's log-sum-exp: exp(x[j] - m) into buf (a vector loop) and their sum s in fixed lanes, so
// that softmax(x)[j] = buf[j] / s.
template <class A> struct RowLse {
  A lse, s;
};
template <class T, class A> inline RowLse<A> row_lse(const T* x, int64_t c, A* buf) {
  if (c <= 0) return {A(0) / A(0), A(0)};
  A lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = ld<T, A>(x, 0);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = dl_max(lanes[l], ld<T, A>(x, j + l));
  A m = dl_max(dl_max(dl_max(lanes[0], lanes[1]), dl_max(lanes[2], lanes[3])),
               dl_max(dl_max(lanes[4], lanes[5]), dl_max(lanes[6], lanes[7])));
  for (; j < c; ++j) m = dl_max(m, ld<T, A>(x, j));
  // dl_max skips a NaN, but exp(NaN - m) makes the sum NaN, as torch's log-sum-exp is.
  for (int64_t k = 0; k < c; ++k) buf[k] = dl_exp(ld<T, A>(x, k) - m);
  const A s = lane_sum(buf, c);
  return {m + dl_log(s), s};
}

// d(row loss)/dx[j] times coef: softmax(x)[j] (sum of the coefficients) minus each coefficient at
// its column.
template <class T, class A> inline void row_grad(T* g, const A* p, A p_scale, int64_t c, const SparseTarget<A>& st,
                                                 A coef) {
  const A total = (st.coef[0] + st.coef[1]) * coef * p_scale;
  const A d0 = st.coef[0] * coef, d1 = st.coef[1] * coef;
  const int64_t i0 = st.coef[0] != A(0) ? st.idx[0] : -1, i1 = st.coef[1] != A(0) ? st.idx[1] : -1;
  for (int64_t j = 0; j < c; ++j) {
    A d = p[j] * total;
    d -= j == i0 ? d0 : A(0);
    d -= j == i1 ? d1 : A(0);
    g[j] = static_cast<T>(d);
  }
}

template <class E, class T, bool WG> int64_t row_forward(const Args& args) {
  using A = typename AccOf<T>::type;
  const E e(args);
  const int64_t n = args.n, c = args.c;
  const int64_t rows_per_chunk = std::max<int64_t>(1, CHUNK_ELEMS / std::max<int64_t>(c, 1));
  const int64_t n_chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
  const T* pred = reinterpret_cast<const T*>(args.pred);
  const T* weight = reinterpret_cast<const T*>(args.weight);
  T* out = reinterpret_cast<T*>(args.out);
  T* grad = reinterpret_cast<T*>(args.grad_buf);
  A* lse_out = reinterpret_cast<A*>(args.row_stat);
  const A lw = A(args.loss_weight);
  const A gscale = lw / reduction_divisor<A>(args);
  std::vector<double> partial(n_chunks, 0.0);
  std::vector<int64_t> invalid(n_chunks, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<A> buf(size_t(std::max<int64_t>(c, 1)));
    for (int64_t ch = cb; ch < ce; ++ch) {
      double acc = 0.0;
      for (int64_t i = ch * rows_per_chunk; i < std::min(n, (ch + 1) * rows_per_chunk); ++i) {
        const SparseTarget<A> st = row_target<E, T, A>(e, args, i);
        const T* x = pred + i * c;
        T* g = WG ? grad + i * c : nullptr;
        A l = A(0);
        if (st.bad) invalid[ch]++;
        if (st.valid && !st.bad) {
          const RowLse<A> r = row_lse(x, c, buf.data());
          if (lse_out) lse_out[i] = r.lse;
          for (int k = 0; k < 2; ++k)
            if (st.coef[k] != A(0)) l += st.coef[k] * (r.lse - ld<T, A>(x, st.idx[k]));
          const A w = weight ? ld<T, A>(weight, i * args.w_sn) : A(1);
          l *= w;
          if (WG) row_grad(g, buf.data(), A(1) / r.s, c, st, w * gscale);
        } else if (WG) {
          for (int64_t j = 0; j < c; ++j) g[j] = static_cast<T>(A(0));
        }
        if (args.reduction == RED_NONE)
          out[i] = static_cast<T>(lw * l);
        else
          acc += double(l);
      }
      partial[ch] = acc;
    }
  });
  return finish_forward<T, A>(args, partial, invalid);
}

template <class E, class T> int64_t row_backward(const Args& args) {
  using A = typename AccOf<T>::type;
  const E e(args);
  const int64_t n = args.n, c = args.c;
  const T* pred = reinterpret_cast<const T*>(args.pred);
  const T* weight = reinterpret_cast<const T*>(args.weight);
  const T* go = reinterpret_cast<const T*>(args.grad_out);
  const A* lse_in = reinterpret_cast<const A*>(args.row_stat);
  T* out = reinterpret_cast<T*>(args.out);
  const A scale = A(args.loss_weight) / reduction_divisor<A>(args);
  // The forward pass has reported targets out of range; their gradients are NaN.
  at::parallel_for(0, n, std::max<int64_t>(1, CHUNK_ELEMS / std::max<int64_t>(c, 1)), [&](int64_t b, int64_t end) {
    std::vector<A> p(size_t(std::max<int64_t>(c, 1)));
    for (int64_t i = b; i < end; ++i) {
      const SparseTarget<A> st = row_target<E, T, A>(e, args, i);
      const T* x = pred + i * c;
      T* g = out + i * c;
      if (!st.valid || st.bad) {
        for (int64_t j = 0; j < c; ++j) g[j] = static_cast<T>(st.bad ? A(0) / A(0) : A(0));
        continue;
      }
      const A coef = (weight ? ld<T, A>(weight, i * args.w_sn) : A(1)) * scale * ld<T, A>(go, i * args.g_sn);
      const A lse = lse_in[i];
      for (int64_t j = 0; j < c; ++j) p[j] = dl_exp(ld<T, A>(x, j) - lse);
      row_grad(g, p.data(), A(1), c, st, coef);
    }
  });
  return 0;
}

// ---- Scan-row bodies: the body scans its row through a HostScan (common.cuh, ScanRowBody).
// Each reduction first writes f(j) to the row's buffer, a loop that vectorizes where f does, then
// reduces the buffer in fixed lanes.
template <class T, class A> struct HostScan {
  const T* xr;
  const T* tr;    // the dense target row (TARGET_DENSE), else null
  int64_t label;  // the class-index target (TARGET_LABELS), else -1
  int64_t c;
  T* g;           // the row's gradient (write), else null
  double* space;  // (1 + SCAN_SLOTS) c values of any type up to double: scratch, then the slots
  // What lse(.., slot) kept: the slot holds exp(f(j) - max), and `scale` turns it into
  // exp(f(j) - lse). A fresh scan (the backward pass's) keeps nothing and recomputes.
  mutable bool kept[SCAN_SLOTS] = {};
  mutable double scale[SCAN_SLOTS] = {};
  template <class R> DL_HD R* buffer(int slot) const { return reinterpret_cast<R*>(space + (slot + 1) * c); }
  DL_HD A x(int64_t j) const { return ld<T, A>(xr, j); }
  DL_HD A t(int64_t j) const { return ld<T, A>(tr, j); }
  // The reductions run in f's result type R (a body may compute wider than A).
  template <class F> DL_HD auto sum(int64_t m, F f) const -> decltype(f(int64_t(0))) {
    using R = decltype(f(int64_t(0)));
    R* buf = buffer<R>(-1);
    for (int64_t j = 0; j < m; ++j) buf[j] = f(j);
    return lane_sum(buf, m);
  }
  // torch's log-sum-exp: the maximum, then the sum of exp(v - max); -inf for no columns.
  template <class F> DL_HD auto lse(int64_t n, F f, int slot = -1) const -> decltype(f(int64_t(0))) {
    using R = decltype(f(int64_t(0)));
    R* buf = buffer<R>(slot);
    for (int64_t j = 0; j < n; ++j) buf[j] = f(j);
    R lanes[8];
    for (int l = 0; l < 8; ++l) lanes[l] = n > 0 ? buf[0] : R(0);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int l = 0; l < 8; ++l) lanes[l] = dl_max(lanes[l], buf[j + l]);
    R m = dl_max(dl_max(dl_max(lanes[0], lanes[1]), dl_max(lanes[2], lanes[3])),
                 dl_max(dl_max(lanes[4], lanes[5]), dl_max(lanes[6], lanes[7])));
    for (; j < n; ++j) m = dl_max(m, buf[j]);
    for (int64_t k = 0; k < n; ++k) buf[k] = dl_exp(buf[k] - m);
    const R s = lane_sum(buf, n);
    if (slot >= 0) {
      kept[slot] = true;
      scale[slot] = double(R(1) / s);
    }
    return m + dl_log(s);
  }
  // exp(f(j) - lse): the softmax of what lse(.., slot) reduced, from the slot where it was kept.
  template <class F> DL_HD auto softmax(int slot, int64_t j, F f, decltype(f(int64_t(0))) lse) const
      -> decltype(f(int64_t(0))) {
    using R = decltype(f(int64_t(0)));
    return kept[slot] ? buffer<R>(slot)[j] * R(scale[slot]) : dl_exp(f(j) - lse);
  }
  template <class F> DL_HD void write(F f) const {
    for (int64_t j = 0; j < c; ++j) g[j] = static_cast<T>(A(f(j)));
  }
};

template <class T, class A> inline HostScan<T, A> host_scan(const Args& a, int64_t i, T* g, double* space) {
  const int64_t c = a.c;
  const bool dense = a.target_mode == TARGET_DENSE;
  return {reinterpret_cast<const T*>(a.pred) + i * c,
          dense ? reinterpret_cast<const T*>(a.target) + i * c : nullptr,
          dense ? int64_t(-1) : reinterpret_cast<const int64_t*>(a.target)[i],
          c,
          g,
          space,
          {},
          {}};
}

template <class E, class T, bool WG> int64_t scan_forward(const Args& args) {
  using A = typename AccOf<T>::type;
  const E e(args);
  const int64_t n = args.n, c = args.c;
  const int64_t rows_per_chunk = std::max<int64_t>(1, CHUNK_ELEMS / std::max<int64_t>(c, 1));
  const int64_t n_chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
  const T* weight = reinterpret_cast<const T*>(args.weight);
  T* out = reinterpret_cast<T*>(args.out);
  T* grad = reinterpret_cast<T*>(args.grad_buf);
  double* stat_out = reinterpret_cast<double*>(args.row_stat);
  const A lw = A(args.loss_weight);
  const A gscale = lw / reduction_divisor<A>(args);
  std::vector<double> partial(n_chunks, 0.0);
  std::vector<int64_t> invalid(n_chunks, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<double> buf(size_t((1 + SCAN_SLOTS) * std::max<int64_t>(c, 1)));
    for (int64_t ch = cb; ch < ce; ++ch) {
      double acc = 0.0;
      for (int64_t i = ch * rows_per_chunk; i < std::min(n, (ch + 1) * rows_per_chunk); ++i) {
        T* g = WG ? grad + i * c : nullptr;
        const HostScan<T, A> s = host_scan<T, A>(args, i, g, buf.data());
        const RowCheck rc = e.check(s);
        A l = A(0);
        if (rc.bad) invalid[ch]++;
        if (rc.valid && !rc.bad) {
          double stat[SCAN_STATS];
          l = e.forward(s, stat);
          if (stat_out)
            for (int k = 0; k < SCAN_STATS; ++k) stat_out[i * SCAN_STATS + k] = stat[k];
          const A w = weight ? ld<T, A>(weight, i * args.w_sn) : A(1);
          l *= w;
          if (WG) e.backward(s, stat, w * gscale);
        } else if (WG) {
          for (int64_t j = 0; j < c; ++j) g[j] = static_cast<T>(A(0));
        }
        if (args.reduction == RED_NONE)
          out[i] = static_cast<T>(lw * l);
        else
          acc += double(l);
      }
      partial[ch] = acc;
    }
  });
  return finish_forward<T, A>(args, partial, invalid);
}

template <class E, class T> int64_t scan_backward(const Args& args) {
  using A = typename AccOf<T>::type;
  const E e(args);
  const int64_t n = args.n, c = args.c;
  const T* weight = reinterpret_cast<const T*>(args.weight);
  const T* go = reinterpret_cast<const T*>(args.grad_out);
  const double* stat_in = reinterpret_cast<const double*>(args.row_stat);
  T* out = reinterpret_cast<T*>(args.out);
  const A scale = A(args.loss_weight) / reduction_divisor<A>(args);
  at::parallel_for(0, n, std::max<int64_t>(1, CHUNK_ELEMS / std::max<int64_t>(c, 1)), [&](int64_t b, int64_t end) {
    std::vector<double> buf(size_t((1 + SCAN_SLOTS) * std::max<int64_t>(c, 1)));
    for (int64_t i = b; i < end; ++i) {
      T* g = out + i * c;
      const HostScan<T, A> s = host_scan<T, A>(args, i, g, buf.data());
      const RowCheck rc = e.check(s);
      if (!rc.valid || rc.bad) {
        for (int64_t j = 0; j < c; ++j) g[j] = static_cast<T>(rc.bad ? A(0) / A(0) : A(0));
        continue;
      }
      const A coef = (weight ? ld<T, A>(weight, i * args.w_sn) : A(1)) * scale * ld<T, A>(go, i * args.g_sn);
      e.backward(s, stat_in + i * SCAN_STATS, coef);
    }
  });
  return 0;
}

// ---- Box bodies: one box pair (4 coordinates) per row of [n, 4]. WM: no weight (0), one per box
// (1), or one per coordinate (2), averaged over the box (the IoU family's (N, 4) weight).
template <int WM, class T, class A> DL_HD A box_weight(const T* w, int64_t w_sn, int64_t i, A (&wk)[4]) {
  if (WM == 0) {
    for (int q = 0; q < 4; ++q) wk[q] = A(1);
    return A(1);
  }
  if (WM == 1) {
    const A v = ld<T, A>(w, i * w_sn);
    for (int q = 0; q < 4; ++q) wk[q] = v;
    return v;
  }
  for (int q = 0; q < 4; ++q) wk[q] = ld<T, A>(w, i * w_sn + q);
  return (((wk[0] + wk[1]) + wk[2]) + wk[3]) / A(4);
}

template <class E, class T, int WM, bool WG> int64_t box_forward(const Args& args) {
  using A = typename AccOf<T>::type;
  const E e(args);
  const int64_t n = args.n;
  const int64_t rows_per_chunk = CHUNK_ELEMS / 4;
  const int64_t n_chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
  const T* pred = reinterpret_cast<const T*>(args.pred);
  const T* target = reinterpret_cast<const T*>(args.target);
  const T* weight = reinterpret_cast<const T*>(args.weight);
  const int64_t w_sn = args.w_sn;
  T* out = reinterpret_cast<T*>(args.out);
  T* grad = reinterpret_cast<T*>(args.grad_buf);
  const A lw = A(args.loss_weight);
  const A gscale = lw / reduction_divisor<A>(args);
  const bool shortcut = (args.flags & FLAG_SHORTCUT) && args.reduction != RED_NONE;
  std::vector<double> partial(n_chunks, 0.0);
  std::vector<int64_t> invalid(n_chunks, 0);
  ShortcutParts sc(shortcut ? n_chunks : 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    // The box loop writes only these block buffers, so that it vectorizes (a store through grad
    // could alias the closure's captures); the conversions to T follow in plain loops.
    alignas(64) A buf[BLOCK];
    alignas(64) A gb[WG ? 4 * BLOCK : 1];
    for (int64_t ch = cb; ch < ce; ++ch) {
      double acc = 0.0;
      const int64_t end = std::min(n, (ch + 1) * rows_per_chunk);
      for (int64_t i0 = ch * rows_per_chunk; i0 < end; i0 += BLOCK) {
        const int64_t m = std::min(BLOCK, end - i0);
        const T* const bp = pred + i0 * 4;
        const T* const bt = target + i0 * 4;
        for (int64_t k = 0; k < m; ++k) {
          A p[4], t[4], g[4], wk[4];
          for (int q = 0; q < 4; ++q) {
            p[q] = ld<T, A>(bp, k * 4 + q);
            t[q] = ld<T, A>(bt, k * 4 + q);
          }
          const A w = box_weight<WM, T, A>(weight, w_sn, i0 + k, wk);
          buf[k] = weighted<true>(e.eval(p, t, g), w);
          if (WG)
            for (int q = 0; q < 4; ++q) gb[k * 4 + q] = weighted<true>(g[q], w) * gscale;
        }
        if (WG)
          for (int64_t j = 0; j < 4 * m; ++j) grad[i0 * 4 + j] = static_cast<T>(gb[j]);
        if (args.reduction == RED_NONE)
          for (int64_t k = 0; k < m; ++k) out[i0 + k] = static_cast<T>(lw * buf[k]);
        else
          acc += double(lane_sum(buf, m));
        if (shortcut)
          for (int64_t i = i0; i < i0 + m; ++i) {
            A wk[4];
            box_weight<WM, T, A>(weight, w_sn, i, wk);
            for (int q = 0; q < 4; ++q) {
              sc.sum[ch] += double(weighted<true>(ld<T, A>(pred, i * 4 + q), wk[q]));
              sc.positive[ch] += wk[q] > A(0);
            }
          }
      }
      partial[ch] = acc;
    }
  });
  bool taken = false;
  const int64_t bad = finish_forward<T, A>(args, partial, invalid, &sc, &taken);
  if (WG && taken)
    for (int64_t i = 0; i < n; ++i) {
      A wk[4];
      box_weight<WM, T, A>(weight, w_sn, i, wk);
      for (int q = 0; q < 4; ++q) grad[i * 4 + q] = static_cast<T>(wk[q]);
    }
  return bad;
}

template <class E, class T, int WM> int64_t box_backward(const Args& args) {
  using A = typename AccOf<T>::type;
  const E e(args);
  const T* pred = reinterpret_cast<const T*>(args.pred);
  const T* target = reinterpret_cast<const T*>(args.target);
  const T* weight = reinterpret_cast<const T*>(args.weight);
  const T* go = reinterpret_cast<const T*>(args.grad_out);
  T* out = reinterpret_cast<T*>(args.out);
  const A scale = A(args.loss_weight) / reduction_divisor<A>(args);
  const bool shortcut = (args.flags & FLAG_SHORTCUT) && *reinterpret_cast<const A*>(args.shortcut) != A(0);
  at::parallel_for(0, args.n, CHUNK_ELEMS / 4, [&](int64_t b, int64_t end) {
    if (shortcut) {
      for (int64_t i = b; i < end; ++i) {
        A wk[4];
        box_weight<WM, T, A>(weight, args.w_sn, i, wk);
        const A up = ld<T, A>(go, i * args.g_sn);
        for (int q = 0; q < 4; ++q) out[i * 4 + q] = static_cast<T>(wk[q] * up);
      }
      return;
    }
    // As in box_forward: the box loop writes a block buffer only, so that it vectorizes.
    alignas(64) A gb[4 * BLOCK];
    for (int64_t i0 = b; i0 < end; i0 += BLOCK) {
      const int64_t m = std::min(BLOCK, end - i0);
      const T* const bp = pred + i0 * 4;
      const T* const bt = target + i0 * 4;
      for (int64_t k = 0; k < m; ++k) {
        A p[4], t[4], g[4], wk[4];
        for (int q = 0; q < 4; ++q) {
          p[q] = ld<T, A>(bp, k * 4 + q);
          t[q] = ld<T, A>(bt, k * 4 + q);
        }
        const A w = box_weight<WM, T, A>(weight, args.w_sn, i0 + k, wk);
        const A up = ld<T, A>(go, (i0 + k) * args.g_sn);
        e.eval(p, t, g);
        for (int q = 0; q < 4; ++q) gb[k * 4 + q] = weighted<true>(g[q], w) * scale * up;
      }
      for (int64_t j = 0; j < 4 * m; ++j) out[i0 * 4 + j] = static_cast<T>(gb[j]);
    }
  });
  return 0;
}

// Calls f(target mode, element weights) as compile-time constants, for the combinations E supports.
template <int V> using IntC = std::integral_constant<int, V>;
template <bool V> using BoolC = std::integral_constant<bool, V>;
template <class E, class F> int64_t dispatch_modes(bool dense, bool welem, F&& f) {
  auto by_weight = [&](auto tm) -> int64_t {
    if constexpr (E::ELEMENT_WEIGHTS) {
      if (welem) return f(tm, BoolC<true>{});
    }
    return f(tm, BoolC<false>{});
  };
  if constexpr (E::LABEL_TARGETS) {
    if (!dense) return by_weight(IntC<TARGET_LABELS>{});
  }
  return by_weight(IntC<TARGET_DENSE>{});
}

// The (target mode, weight, gradient) combinations a loss can meet: each element functor says
// which it supports (E::LABEL_TARGETS: class-index targets besides dense ones; E::ELEMENT_WEIGHTS:
// per-element weights and upstream gradients besides per-row ones), so that no loop is compiled
// for a combination the Rust side never launches. Returns -2 for one it does not support.
template <class E, class T> int64_t run(int32_t pass, const Args& a) {
  if constexpr (E::SHAPE == SHAPE_BOX) {
    if (a.target_mode != TARGET_DENSE || a.c != 4) return -2;
    auto by_weight = [&](auto wm) -> int64_t {
      constexpr int WM = decltype(wm)::value;
      if (pass == PASS_FORWARD) return a.grad_buf ? box_forward<E, T, WM, true>(a) : box_forward<E, T, WM, false>(a);
      return box_backward<E, T, WM>(a);
    };
    if (!a.weight) return by_weight(IntC<0>{});
    return a.w_sc == 0 ? by_weight(IntC<1>{}) : by_weight(IntC<2>{});
  } else if constexpr (E::SHAPE == SHAPE_ROW) {
    using A = typename AccOf<T>::type;
    if (a.weight != 0 && a.w_sc != 0) return -2;
    if constexpr (E::SCAN) {
      if (a.target_mode != (E::LABEL_TARGETS ? TARGET_LABELS : TARGET_DENSE)) return -2;
    }
    if (pass == PASS_FORWARD) {
      if (a.has_avg_factor == AVG_COUNT_VALID && a.reduction == RED_MEAN) {
        const E e(a);
        int64_t count = 0;
        for (int64_t i = 0; i < a.n; ++i) {
          if constexpr (E::SCAN)
            count += e.check(host_scan<T, A>(a, i, nullptr, nullptr)).valid;
          else
            count += row_target<E, T, A>(e, a, i).valid;
        }
        *reinterpret_cast<A*>(a.avg_factor) = A(count);
      }
      if constexpr (E::SCAN)
        return a.grad_buf ? scan_forward<E, T, true>(a) : scan_forward<E, T, false>(a);
      else
        return a.grad_buf ? row_forward<E, T, true>(a) : row_forward<E, T, false>(a);
    }
    if constexpr (E::SCAN)
      return scan_backward<E, T>(a);
    else
      return row_backward<E, T>(a);
  } else {
    const bool dense = a.target_mode == TARGET_DENSE;
    const bool welem = a.weight != 0 && a.w_sc != 0;
    if ((!dense && !E::LABEL_TARGETS) || (welem && !E::ELEMENT_WEIGHTS)) return -2;
    if (pass == PASS_FORWARD) {
      const bool wg = a.grad_buf != 0;
      auto fwd = [&](auto tm, auto we) -> int64_t {
        constexpr int TM = decltype(tm)::value;
        constexpr bool WE = decltype(we)::value;
        prepare<E, T, TM, WE>(a);
        return wg ? forward<E, T, TM, WE, true>(a) : forward<E, T, TM, WE, false>(a);
      };
      return dispatch_modes<E>(dense, welem, fwd);
    }
    // Per-element upstream gradients come with per-element losses, as per-element weights do.
    const bool gelem = a.g_sc != 0;
    if (gelem && !E::ELEMENT_WEIGHTS) return -2;
    auto bwd = [&](auto tm, auto we) -> int64_t {
      constexpr int TM = decltype(tm)::value;
      constexpr bool WE = decltype(we)::value;
      if constexpr (E::ELEMENT_WEIGHTS) {
        if (gelem) return backward<E, T, TM, WE, true>(a);
      }
      return backward<E, T, TM, WE, false>(a);
    };
    return dispatch_modes<E>(dense, welem, bwd);
  }
}

}  // namespace host
DL_NAMESPACE_END
