// GaussianFocalLoss (mmdet/models/losses/gaussian_focal_loss.py, gaussian_focal_loss): CenterNet's
// and CornerNet's focal loss on probabilities p against a gaussian heatmap t, eps = 1e-12:
//   pos  = -log(p + eps) (1 - p)^alpha [t == 1]
//   neg  = -log(1 - p + eps) p^alpha (1 - t)^gamma
//   loss = pos_weight pos + neg_weight neg
// Positives are exactly t == 1. With pos_weight 0 this is the negative term alone, which the
// pos_inds form reduces on its own (src/losses/gaussian_focal.rs).
//
// Slots: p0 = alpha (POW2 when 2), p1 = gamma, p2 = pos_weight, p3 = neg_weight.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A, bool POW2> struct GaussianFocal : ElementBody {
  A alpha, gamma, pos_weight, neg_weight;
  DL_HD explicit GaussianFocal(const Args& a)
      : alpha(A(a.p0)), gamma(A(a.p1)), pos_weight(A(a.p2)), neg_weight(A(a.p3)) {}
  DL_HD A loss(A p, A t) const {
    const A eps = A(1e-12);
    const A pos = (-dl_log(p + eps) * dl_powe<POW2>(A(1) - p, alpha)) * A(t == A(1));
    const A neg = (-dl_log(A(1) - p + eps) * dl_powe<POW2>(p, alpha)) * dl_pow(A(1) - t, gamma);
    return pos_weight * pos + neg_weight * neg;
  }
  DL_HD A grad(A p, A t) const {
    const A eps = A(1e-12);
    const A dpos = -(dl_powe<POW2>(A(1) - p, alpha) / (p + eps)) +
                   dl_log(p + eps) * dl_dpowe<POW2>(A(1) - p, alpha);
    const A dneg = dl_powe<POW2>(p, alpha) / (A(1) - p + eps) - dl_log(A(1) - p + eps) * dl_dpowe<POW2>(p, alpha);
    return pos_weight * (dpos * A(t == A(1))) + neg_weight * (dneg * dl_pow(A(1) - t, gamma));
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_gaussian_focal(a, A, RUN) DL_POW2(a, ::dl::GaussianFocal, A, RUN)
