// SeesawLoss (mmdet/models/losses/seesaw_loss.py): a scan-row body over the whole row of
// num_classes class logits then the 2 objectness logits (C = row length - 2), in two parts, each
// its own launch and its own gradient of the whole row (0 outside its columns), so that neither
// needs a copy of its columns nor a scatter of its gradient back.
//
// Part 0, the classes (`seesaw_ce_loss`). With y the row's label, s = softmax(x[:C]) (detached)
// and n the class counts (cum_samples), the logits of the other classes are raised,
//   z_j = x_j + log(M_j C_j) for j != y, z_y = x_y,
//   M_j = (max(n_j, 1) / max(n_y, 1))^p where that ratio is < 1, else 1 (the mitigation factor,
//         row y of MMDetection's float32 matrix, made by the same torch ops: torch's vectorized
//         pow and a scalar one can differ in the last bit, which float64 logits would show),
//   C_j = (s_j / max(s_y, eps))^q where that ratio is > 1, else 1 (the compensation factor; q = 0:
//         none),
// and the row's loss is the cross-entropy lse(z) - x_y. Neither factor carries a gradient, so
// d/dx_j = softmax(z)_j - [j == y]. A label equal to C (the background) leaves the row out: no
// loss, not counted (MMDetection's loss over the positives alone).
//
// Part 1, the objectness (`cross_entropy` of x[C:] against o = [y == C]): lse(x_C, x_C+1) -
// x_(C + o), with gradient softmax - one-hot on those two columns.
//
// A label outside [0, C] is out of range in both.
//
// Slots: i0 = the part; p1 = q, p2 = eps; aux = the mitigation matrix [C, C] (float32 values in the
// accumulation type) followed by its log (torch's, in that type: the common class's log(M_j C_j)
// with C_j = 1), or 0 for none (p = 0).
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct Seesaw : ScanRowBody {
  bool objectness;
  A q, eps;
  const A* mitigation;      // [C, C], or null
  const A* log_mitigation;  // its log, [C, C]
  int64_t c;                // the classes
  DL_HD explicit Seesaw(const Args& a)
      : objectness(a.i0 == 1),
        q(A(a.p1)),
        eps(A(a.p2)),
        mitigation(reinterpret_cast<const A*>(a.aux)),
        log_mitigation(mitigation ? mitigation + (a.c - 2) * (a.c - 2) : nullptr),
        c(a.c - 2) {}
  template <class S> DL_HD RowCheck check(const S& s) const {
    return {objectness || s.label != c, s.label < 0 || s.label > c};
  }

  // What z needs of the row: its log-sum-exp (for the softmax), its label's clamped score, and
  // the logit above which a class's score can beat it (log space, with a margin far above the
  // rounding of either side): below it the compensation factor is 1, which spares the common
  // class its exp, division and log.
  struct Ctx {
    A lse_x, own, above;
  };
  template <class S> DL_HD Ctx ctx(const S& s, A lse_x) const {
    if (!(q > A(0))) return {lse_x, A(1), A(1) / A(0)};
    const A own = dl_max(dl_exp(s.x(s.label) - lse_x), eps);
    return {lse_x, own, lse_x + dl_log(own) - A(1e-3)};
  }
  template <class S> DL_HD A z(const S& s, int64_t j, const Ctx& k) const {
    const A x = s.x(j);
    if (j == s.label) return x;
    const int64_t at = s.label * c + j;
    if (!(x > k.above)) return mitigation ? x + log_mitigation[at] : x;
    const A m = dl_exp(x - k.lse_x) / k.own;
    const A comp = m > A(1) ? torch_pow(m, q) : A(1);
    return x + dl_log((mitigation ? mitigation[at] : A(1)) * comp);
  }
  // The objectness logits' log-sum-exp, as torch's: the maximum plus the log of the shifted sum.
  template <class S> DL_HD A objectness_lse(const S& s) const {
    const A a = s.x(c), b = s.x(c + 1), m = dl_max(a, b);
    return m + dl_log(dl_exp(a - m) + dl_exp(b - m));
  }

  template <class S> DL_HD A forward(const S& s, double* stat) const {
    if (objectness) {
      const A lse = objectness_lse(s);
      stat[0] = lse;
      return lse - s.x(c + (s.label == c));
    }
    const A lse_x = q > A(0) ? s.lse(c, [&](int64_t j) { return s.x(j); }) : A(0);
    const Ctx k = ctx(s, lse_x);
    const A lse_z = s.lse(c, [&](int64_t j) { return z(s, j, k); }, 0);
    stat[0] = lse_x;
    stat[1] = lse_z;
    return lse_z - s.x(s.label);
  }
  template <class S> DL_HD void backward(const S& s, const double* stat, A coef) const {
    if (objectness) {
      const A lse = A(stat[0]);
      const int64_t o = c + (s.label == c);
      s.write([&](int64_t j) { return j < c ? A(0) : (dl_exp(s.x(j) - lse) - A(j == o)) * coef; });
      return;
    }
    const Ctx k = ctx(s, A(stat[0]));
    const A lse_z = A(stat[1]);
    const auto zj = [&](int64_t j) { return z(s, j, k); };
    s.write([&](int64_t j) { return j < c ? (s.softmax(0, j, zj, lse_z) - A(j == s.label)) * coef : A(0); });
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_seesaw(a, A, RUN) RUN(::dl::Seesaw<A>)
