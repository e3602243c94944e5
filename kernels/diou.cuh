// DIoULoss (mmdet/models/losses/iou_loss.py, diou_loss): 1 - (IoU - rho^2 / c^2), with eps added
// to the union and to the squared enclosing diagonal c^2.
//
// Slots: p0 = eps.
#pragma once
#include "box.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct DIoU : BoxBody {
  A eps;
  DL_HD explicit DIoU(const Args& a) : eps(A(a.p0)) {}
  DL_HD A eval(const A (&p)[4], const A (&t)[4], A (&g)[4]) const {
    const BoxPair<A> b(p, t);
    const D4<A> iou = b.overlap / (b.pred_area + b.target_area - b.overlap + eps);
    return dual_out(A(1) - (iou - b.distance_term(eps)), g);
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_diou(a, A, RUN) RUN(::dl::DIoU<A>)
