// SIoULoss (mmdet/models/losses/iou_loss.py, siou_loss, from YOLOv6):
// 1 - clamp(IoU - 0.5 (distance + shape), -1, 1) with
//   IoU = overlap / (area_p + area_t - overlap + eps),
//   the centre offsets s_cw, s_ch (+ eps), sigma = sqrt(s_cw^2 + s_ch^2),
//   sin_alpha = |s_ch| / sigma where |s_cw| / sigma > sqrt(2) / 2, else |s_cw| / sigma,
//   angle = cos(2 asin(sin_alpha) - pi / 2), gamma = 2 - angle (angle - 2 with neg_gamma),
//   distance = 2 - exp(gamma (s_cw / cw)^2) - exp(gamma (s_ch / ch)^2) over the enclosing extents
//   (clamped at eps), shape = (1 - exp(-|w1 - w2| / max(w1, w2)))^4 + the same for the heights
//   (+ eps).
//
// Slots: p0 = eps, i0 = neg_gamma.
#pragma once
#include "box.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct SIoU : BoxBody {
  A eps;
  bool neg_gamma;
  DL_HD explicit SIoU(const Args& a) : eps(A(a.p0)), neg_gamma(a.i0 != 0) {}

  // One axis: the centre offset (t_lo + t_hi - p_lo - p_hi) * 0.5 + eps, the enclosing extent
  // clamped at eps, and the shape term (1 - exp(-omega))^4 of extents plus `pad`.
  struct Side {
    D2<A> offset, enclose, shape;
  };
  DL_HD Side side(A p_lo, A p_hi, A t_lo, A t_hi, A pad) const {
    const D2<A> lo = axis_var(p_lo, 0), hi = axis_var(p_hi, 1);
    const D2<A> tlo = dual_const<A, 2>(t_lo), thi = dual_const<A, 2>(t_hi);
    const D2<A> offset = (((tlo + thi) - lo) - hi) * A(0.5) + eps;
    const D2<A> enclose = dual_clamp_min(dual_max(hi, thi) - dual_min(lo, tlo), eps);
    const D2<A> e1 = (hi - lo) + pad;
    const D2<A> e2 = dual_const<A, 2>((t_hi - t_lo) + pad);
    const D2<A> omega = dual_abs(e1 - e2) / dual_max(e1, e2);
    const D2<A> s = A(1) - dual_exp(-omega);
    const D2<A> s2 = s * s;
    return Side{offset, enclose, s2 * s2};
  }

  DL_HD A eval(const A (&p)[4], const A (&t)[4], A (&g)[4]) const {
    const BoxPair<A> b(p, t);
    const D4<A> iou = b.overlap / (b.pred_area + b.target_area - b.overlap + eps);
    const Side x = side(p[0], p[2], t[0], t[2], A(0)), y = side(p[1], p[3], t[1], t[3], eps);
    const D4<A> cw = on_axis(x.offset, 0), ch = on_axis(y.offset, 1);
    const D4<A> sigma = dual_sqrt(cw * cw + ch * ch);
    const D4<A> sin1 = dual_abs(cw) / sigma, sin2 = dual_abs(ch) / sigma;
    // pow(2, 0.5) / 2 in double, as Python computes it.
    const D4<A> sin_alpha = dual_select(sin1.v > A(0.7071067811865476), sin2, sin1);
    const D4<A> angle = dual_cos(dual_asin(sin_alpha) * A(2) - A(1.5707963267948966));
    const D4<A> gamma = neg_gamma ? angle - A(2) : A(2) - angle;
    const D2<A> rx = x.offset / x.enclose, ry = y.offset / y.enclose;
    const D4<A> distance = (A(2) - dual_exp(gamma * on_axis(rx * rx, 0))) - dual_exp(gamma * on_axis(ry * ry, 1));
    const D4<A> shape = on_axis(x.shape, 0) + on_axis(y.shape, 1);
    const D4<A> siou = iou - (distance + shape) * A(0.5);
    return dual_out(A(1) - dual_clamp(siou, A(-1), A(1)), g);
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_siou(a, A, RUN) RUN(::dl::SIoU<A>)
