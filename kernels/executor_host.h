// The CPU executor: walks rows of [n, c] in fixed chunks over libtorch's intra-op thread pool and
// applies a loss's element functions (focal.cuh, ...) to each element. Compiled by build.rs once
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
        n_chunks((n + rows_per_chunk - 1) / rows_per_chunk) {}

  // The rows of chunk ch: [chunk_begin(ch), chunk_end(ch)).
  int64_t chunk_begin(int64_t ch) const { return ch * rows_per_chunk; }
  int64_t chunk_end(int64_t ch) const { return std::min(n, (ch + 1) * rows_per_chunk); }

  // Fills r for row i; returns false for a label outside the valid range (strict mode).
  template <int TM> bool row(int64_t i, Row<T, A>& r) const {
    r.x = pred + i * c;
    r.tgt = target + i * c;
    r.w = weight ? weight + i * a.w_sn : nullptr;
    r.wr = (weight && a.w_sc == 0) ? ld<T, A>(weight, i * a.w_sn) : A(1);
    r.label = -1;
    r.score = A(1);
    bool ok = true;
    if (TM != TARGET_DENSE) {
      int64_t l = labels[i];
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

  at::parallel_for(0, L.n_chunks, 1, [&](int64_t cb, int64_t ce) {
    alignas(64) A buf[BLOCK];
    for (int64_t ch = cb; ch < ce; ++ch) {
      double acc = 0.0;
      for (int64_t i = L.chunk_begin(ch); i < L.chunk_end(ch); ++i) {
        Row<T, A> r;
        if (!L.template row<TM>(i, r)) invalid[ch]++;
        A row_total = A(0);
        for (int64_t j0 = 0; j0 < c; j0 += BLOCK) {
          const int64_t m = std::min(BLOCK, c - j0);
          const T* x = r.x + j0;
          T* g = WG ? grad + i * c + j0 : nullptr;
          for (int64_t k = 0; k < m; ++k) {
            const A w = WELEM ? ld<T, A>(r.w, j0 + k) : r.wr;
            const A xk = ld<T, A>(x, k), tk = target_at<T, A, TM>(r, j0 + k);
            buf[k] = e.loss(xk, tk) * w;
            if (WG) g[k] = static_cast<T>(e.grad(xk, tk) * (w * gscale));
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

  int64_t bad = 0;
  for (int64_t v : invalid) bad += v;
  if (args.reduction != RED_NONE) {
    double total = 0.0;
    for (double v : partial) total += v;
    out[0] = static_cast<T>(A(double(lw) * (total / double(reduction_divisor<A>(args)))));
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

  at::parallel_for(0, L.n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      for (int64_t i = L.chunk_begin(ch); i < L.chunk_end(ch); ++i) {
        Row<T, A> r;
        if (!L.template row<TM>(i, r)) invalid[ch]++;
        const T* gr = go + i * args.g_sn;
        const A rs = scale * r.wr * (GELEM ? A(1) : ld<T, A>(gr, 0));
        T* o = out + i * c;
        for (int64_t j = 0; j < c; ++j) {
          A g = e.grad(ld<T, A>(r.x, j), target_at<T, A, TM>(r, j)) * rs;
          if (WELEM) g *= ld<T, A>(r.w, j);
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
  const bool dense = a.target_mode == TARGET_DENSE;
  const bool welem = a.weight != 0 && a.w_sc != 0;
  if ((!dense && !E::LABEL_TARGETS) || (welem && !E::ELEMENT_WEIGHTS)) return -2;
  if (pass == PASS_FORWARD) {
    const bool wg = a.grad_buf != 0;
    auto fwd = [&](auto tm, auto we) -> int64_t {
      constexpr int TM = decltype(tm)::value;
      constexpr bool WE = decltype(we)::value;
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

}  // namespace host
DL_NAMESPACE_END
