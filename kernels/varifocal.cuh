// VarifocalLoss (mmdet/models/losses/varifocal_loss.py): varifocal_loss.
//
//   w    = t > 0 ? (iou_weighted ? t : 1) : alpha |sigma - t|^gamma
//   loss = BCE(x, t) * w
// The weight is not detached: its negative branch contributes to the gradient.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

// POW2: gamma == 2. p0 = gamma, p1 = alpha.
template <class A, bool POW2> struct Varifocal : ElementBody {
  A gamma, alpha;
  A iou_weighted;  // 1 or 0; a value type, not bool, so that GCC can vectorize the host loops
  DL_HD explicit Varifocal(const Args& a)
      : gamma(A(a.p0)), alpha(A(a.p1)), iou_weighted((a.flags & FLAG_IOU_WEIGHTED) ? A(1) : A(0)) {}
  DL_HD A loss(A x, A t) const {
    Logit<A> s(x, t);
    A pos = iou_weighted != A(0) ? t : A(1);
    A w = t > A(0) ? pos : alpha * dl_powe<POW2>(dl_abs(s.p - t), gamma);
    return s.bce * w;
  }
  DL_HD A grad(A x, A t) const {
    Logit<A> s(x, t);
    A d = s.p - t;
    A pos = iou_weighted != A(0) ? t : A(1);
    A w = t > A(0) ? pos : alpha * dl_powe<POW2>(dl_abs(d), gamma);
    A dw = t > A(0) ? A(0) : alpha * dl_dpowe<POW2>(dl_abs(d), gamma) * dl_sign(d) * (s.p * (A(1) - s.p));
    return (s.p - t) * w + s.bce * dw;
  }
};

DL_NAMESPACE_END

// POW2 when gamma == 2.
#define DL_DISPATCH_varifocal(a, A, RUN) DL_POW2(a, ::dl::Varifocal, A, RUN)
