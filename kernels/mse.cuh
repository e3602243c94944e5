// MSELoss (mmdet/models/losses/mse_loss.py, mse_loss): F.mse_loss(pred, target, reduction='none'),
// (pred - target)^2, with gradient 2 (pred - target). MMDetection's `weighted_loss` has no
// zero-weight short-cut here, and a weight of 0 multiplies the element loss as torch does (0 * inf
// is NaN), so the weights are not masked.
//
// Slots: none.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct Mse : ElementBody {
  DL_HD explicit Mse(const Args&) {}
  DL_HD A loss(A x, A t) const {
    const A d = x - t;
    return d * d;
  }
  DL_HD A grad(A x, A t) const { return A(2) * (x - t); }
};

DL_NAMESPACE_END

#define DL_DISPATCH_mse(a, A, RUN) RUN(::dl::Mse<A>)
