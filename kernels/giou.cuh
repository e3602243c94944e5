// GIoULoss (mmdet/models/losses/iou_loss.py, giou_loss): 1 - GIoU from bbox_overlaps(mode='giou',
// is_aligned=True, eps): the union and the enclosing area each clamped at eps (torch.max with an
// eps tensor: half the gradient at a tie).
//
// Slots: p0 = eps.
#pragma once
#include "box.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct GIoU : BoxBody {
  A eps;
  DL_HD explicit GIoU(const Args& a) : eps(A(a.p0)) {}
  DL_HD A eval(const A (&p)[4], const A (&t)[4], A (&g)[4]) const {
    const BoxPair<A> b(p, t);
    const D4<A> e = dual_const<A, 4>(eps);
    const D4<A> uni = dual_max(b.pred_area + b.target_area - b.overlap, e);
    const D4<A> iou = b.overlap / uni;
    const D4<A> enclose = dual_max(b.enclose_area(), e);
    return dual_out(A(1) - (iou - (enclose - uni) / enclose), g);
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_giou(a, A, RUN) RUN(::dl::GIoU<A>)
