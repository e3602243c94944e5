// EIoULoss (mmdet/models/losses/iou_loss.py, eiou_loss, from libfacedetection): the smooth loss of
// u = 1 - I / (area_p + area_t - I + eps), where I is libfacedetection's intersection
// (ix2 - ex1)(iy2 - ey1) + (xmin - ex1)(ymin - ey1) - (ix1 - ex1)(ymax - ey1) - (xmax - ex1)(iy1 - ey1)
// over ex1 = min(x1), ix1 = max(x1), ix2 = min(x2), xmin / xmax = min / max(ix1, ix2) (and the
// same in y): the true intersection for overlapping boxes, negative (no clamp) for disjoint ones.
// The loss is 0.5 u^2 / s below the smooth point s (a constant switch, detached) and u - 0.5 s
// above it.
//
// Slots: p0 = eps, p1 = smooth_point.
#pragma once
#include "box.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct EIoU : BoxBody {
  A eps, smooth_point;
  DL_HD explicit EIoU(const Args& a) : eps(A(a.p0)), smooth_point(A(a.p1)) {}

  // One axis: (ix2 - ex1, xmin - ex1, ix1 - ex1, xmax - ex1) and the pred extent.
  struct Side {
    D2<A> i2, mn, i1, mx, extent;
  };
  DL_HD static Side side(A p_lo, A p_hi, A t_lo, A t_hi) {
    const D2<A> lo = axis_var(p_lo, 0), hi = axis_var(p_hi, 1);
    const D2<A> tlo = dual_const<A, 2>(t_lo), thi = dual_const<A, 2>(t_hi);
    const D2<A> e1 = dual_min(lo, tlo), i1 = dual_max(lo, tlo), i2 = dual_min(hi, thi);
    return Side{i2 - e1, dual_min(i1, i2) - e1, i1 - e1, dual_max(i1, i2) - e1, hi - lo};
  }

  DL_HD A eval(const A (&p)[4], const A (&t)[4], A (&g)[4]) const {
    const Side x = side(p[0], p[2], t[0], t[2]), y = side(p[1], p[3], t[1], t[3]);
    const D4<A> inter = outer(x.i2, y.i2) + outer(x.mn, y.mn) - outer(x.i1, y.mx) - outer(x.mx, y.i1);
    const A target_area = (t[2] - t[0]) * (t[3] - t[1]);
    const D4<A> u = A(1) - inter / (outer(x.extent, y.extent) + target_area - inter + eps);
    // MMDetection's blend by the 0/1 switch, as arithmetic (which vectorizes).
    const A s = A(u.v < smooth_point);
    const D4<A> loss = (u * u) * (A(0.5) * s) / smooth_point + (u - A(0.5) * smooth_point) * (A(1) - s);
    return dual_out(loss, g);
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_eiou(a, A, RUN) RUN(::dl::EIoU<A>)
