// GHMR (mmdet/models/losses/ghm_loss.py): the authentic smooth L1 sqrt(d^2 + mu^2) - mu with
// d = pred - target, on the histogram executor. An element's gradient norm
// g = |d / sqrt(mu^2 + d^2)| places it in a bin (float32 edges, the last at 1e3); where its label
// weight is > 0 its weight is tot / (elements in its bin, or the momentum average), divided by the
// number of non-empty bins; elsewhere 0 (and the element contributes exactly 0). tot =
// max(sum of the label weights, 1), summed by the caller as MMDetection sums it (float32, torch's
// order: `label_weight.float().sum()`, Args::hist_tot), is the divisor of 'mean'. The bin weights carry
// no gradient (MMDetection detaches g).
//
// Slots: p0 = mu, p1 = mu * mu (formed in double, as Python forms it).
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct Ghmr : ElementBody {
  static constexpr bool HISTOGRAM = true, MASKED_WEIGHTS = true;
  A mu, mu2;
  DL_HD explicit Ghmr(const Args& a) : mu(A(a.p0)), mu2(A(a.p1)) {}
  DL_HD A loss(A x, A t) const {
    const A d = x - t;
    return dl_sqrt(d * d + mu2) - mu;
  }
  DL_HD A grad(A x, A t) const {
    const A d = x - t;
    return d / dl_sqrt(d * d + mu2);
  }
  // MMDetection's mu^2 + d^2, written as in loss() (the same value) so that the forward pass
  // computes the square root once.
  DL_HD A hist_g(A x, A t) const {
    const A d = x - t;
    return dl_abs(d / dl_sqrt(d * d + mu2));
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_ghmr(a, A, RUN) RUN(::dl::Ghmr<A>)
