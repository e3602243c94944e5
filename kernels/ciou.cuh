// CIoULoss (mmdet/models/losses/iou_loss.py, ciou_loss): 1 - clamp(IoU - (rho^2 / c^2 + alpha v),
// -1, 1) with v = 4 / pi^2 (atan(w2 / h2) - atan(w1 / h1))^2, eps added to the union, to c^2 and
// to both heights, and alpha = (iou > 0.5) v / (1 - iou + v) a constant (MMDetection computes it
// under no_grad).
//
// Slots: p0 = eps.
#pragma once
#include "box.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct CIoU : BoxBody {
  A eps;
  DL_HD explicit CIoU(const Args& a) : eps(A(a.p0)) {}
  DL_HD A eval(const A (&p)[4], const A (&t)[4], A (&g)[4]) const {
    const BoxPair<A> b(p, t);
    const D4<A> iou = b.overlap / (b.pred_area + b.target_area - b.overlap + eps);
    const A target_angle = dl_atan(b.x.target_extent / (b.y.target_extent + eps));
    const D4<A> da = target_angle - dual_atan(ratio(b.x.extent, b.y.extent + eps));
    // 4 / math.pi ** 2 in double, as Python computes it.
    const D4<A> v = (da * da) * A(4.0 / (3.141592653589793 * 3.141592653589793));
    const A alpha = (A(iou.v > A(0.5)) * v.v) / (A(1) - iou.v + v.v);
    const D4<A> ciou = iou - (b.distance_term(eps) + v * alpha);
    return dual_out(A(1) - dual_clamp(ciou, A(-1), A(1)), g);
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_ciou(a, A, RUN) RUN(::dl::CIoU<A>)
