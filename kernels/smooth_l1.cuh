// SmoothL1Loss (mmdet/models/losses/smooth_l1_loss.py, smooth_l1_loss): with d = |pred - target|,
// torch.where(d < beta, 0.5 d d / beta, d - 0.5 beta); d == beta takes the linear branch. The
// gradient has torch's sign (0 where pred == target). The division by beta is a multiplication by
// 1 / beta (within an ulp of torch's division): a division's slow path is a call on the device,
// around which ptxas spilled the element loop's registers.
//
// Slots: p0 = beta.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct SmoothL1 : ElementBody {
  static constexpr bool MASKED_WEIGHTS = true;
  A beta, inv_beta, half_beta;
  DL_HD explicit SmoothL1(const Args& a) : beta(A(a.p0)), inv_beta(A(1.0 / a.p0)), half_beta(A(0.5 * a.p0)) {}
  DL_HD A loss(A x, A t) const {
    const A d = dl_abs(x - t);
    return d < beta ? A(0.5) * d * d * inv_beta : d - half_beta;
  }
  DL_HD A grad(A x, A t) const {
    const A d = dl_abs(x - t);
    return (d < beta ? d * inv_beta : A(1)) * dl_sign(x - t);
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_smooth_l1(a, A, RUN) RUN(::dl::SmoothL1<A>)
