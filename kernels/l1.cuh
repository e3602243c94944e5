// L1Loss (mmdet/models/losses/smooth_l1_loss.py, l1_loss): |pred - target|, with torch's sign as
// the gradient (0 where pred == target).
//
// Slots: none.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct L1 : ElementBody {
  static constexpr bool MASKED_WEIGHTS = true;
  DL_HD explicit L1(const Args&) {}
  DL_HD A loss(A x, A t) const { return dl_abs(x - t); }
  DL_HD A grad(A x, A t) const { return dl_sign(x - t); }
};

DL_NAMESPACE_END

#define DL_DISPATCH_l1(a, A, RUN) RUN(::dl::L1<A>)
