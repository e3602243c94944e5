// IoULoss (mmdet/models/losses/iou_loss.py, iou_loss): MMDetection's bbox_overlaps(pred, target,
// is_aligned=True) with its own default eps (the union clamped at 1e-6), then clamp(min=eps) of
// the IoU with the config's eps, which passes no gradient below it (disjoint boxes), and the mode:
// linear 1 - iou, square 1 - iou^2, log -ln(iou) (-0.0 for identical boxes, as torch gives).
//
// Slots: p0 = eps, i0 = mode (0 linear, 1 square, 2 log).
#pragma once
#include "box.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct IoU : BoxBody {
  A eps;
  int mode;
  DL_HD explicit IoU(const Args& a) : eps(A(a.p0)), mode(int(a.i0)) {}
  DL_HD A eval(const A (&p)[4], const A (&t)[4], A (&g)[4]) const {
    const BoxPair<A> b(p, t);
    const D4<A> uni = dual_max(b.pred_area + b.target_area - b.overlap, dual_const<A, 4>(A(1e-6)));
    const D4<A> iou = dual_clamp_min(b.overlap / uni, eps);
    if (mode == 0) return dual_out(A(1) - iou, g);
    if (mode == 1) return dual_out(A(1) - iou * iou, g);
    return dual_out(-dual_log(iou), g);
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_iou(a, A, RUN) RUN(::dl::IoU<A>)
