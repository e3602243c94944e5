// BalancedL1Loss (mmdet/models/losses/balanced_l1_loss.py, balanced_l1_loss): with
// d = |pred - target| and b = e^(gamma / alpha) - 1 (Python float64),
//   d < beta:  alpha / b (b d + 1) ln(b d / beta + 1) - alpha d
//   else:      gamma d + gamma / b - alpha beta
// and torch's sign in the gradient (0 where pred == target). The Python-side scalar products are
// formed in double, as Python forms them; b / beta is one such factor (within an ulp of torch's
// b d / beta), which keeps divisions, and their slow-path calls on the device, out of the loop.
//
// Slots: p0 = alpha, p1 = gamma, p2 = beta, p3 = b.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct BalancedL1 : ElementBody {
  static constexpr bool MASKED_WEIGHTS = true;
  A alpha, gamma, beta, b, alpha_over_b, gamma_over_b, alpha_beta, b_over_beta;
  DL_HD explicit BalancedL1(const Args& a)
      : alpha(A(a.p0)),
        gamma(A(a.p1)),
        beta(A(a.p2)),
        b(A(a.p3)),
        alpha_over_b(A(a.p0 / a.p3)),
        gamma_over_b(A(a.p1 / a.p3)),
        alpha_beta(A(a.p0 * a.p2)),
        b_over_beta(A(a.p3 / a.p2)) {}
  DL_HD A loss(A x, A t) const {
    const A d = dl_abs(x - t);
    return d < beta ? alpha_over_b * (b * d + A(1)) * dl_log(b_over_beta * d + A(1)) - alpha * d
                    : gamma * d + gamma_over_b - alpha_beta;
  }
  DL_HD A grad(A x, A t) const {
    const A d = dl_abs(x - t);
    const A u = b_over_beta * d + A(1);
    const A inner = alpha_over_b * b * dl_log(u) + alpha_over_b * (b * d + A(1)) * b_over_beta / u - alpha;
    return (d < beta ? inner : gamma) * dl_sign(x - t);
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_balanced_l1(a, A, RUN) RUN(::dl::BalancedL1<A>)
