// What the IoU family's kernel bodies share (iou.cuh, giou.cuh, diou.cuh, ciou.cuh, eiou.cuh, siou.cuh): forward-mode
// dual numbers over the 4 coordinates of a predicted xyxy box, so that one source gives the loss
// and its gradient, and the geometry of a box pair built from them.
//
// The derivatives follow autograd's rules where they differ from calculus: max and min give half
// the gradient to each side at a tie (identical boxes are common), clamp passes it at its bounds.
// An x-axis quantity depends on (x1, x2) only and a y-axis one on (y1, y2): they are Dual<A, 2>
// until a product or a quotient mixes the axes into a Dual<A, 4> over (x1, y1, x2, y2), which
// keeps the per-box arithmetic small.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

// A value and its partial derivatives: over (lo, hi) of one axis (K = 2) or (x1, y1, x2, y2) (K = 4).
template <class A, int K> struct Dual {
  A v;
  A d[K];
};
template <class A> using D2 = Dual<A, 2>;
template <class A> using D4 = Dual<A, 4>;

template <class A, int K> DL_HD Dual<A, K> dual_const(A v) {
  Dual<A, K> r;
  r.v = v;
  for (int k = 0; k < K; ++k) r.d[k] = A(0);
  return r;
}
// The k-th variable of its axis.
template <class A> DL_HD D2<A> axis_var(A v, int k) {
  D2<A> r = dual_const<A, 2>(v);
  r.d[k] = A(1);
  return r;
}
// An axis quantity as a function of the 4 coordinates: x lives in slots 0 and 2, y in 1 and 3.
template <class A> DL_HD D4<A> on_axis(const D2<A>& a, int axis) {
  D4<A> r = dual_const<A, 4>(a.v);
  r.d[axis] = a.d[0];
  r.d[axis + 2] = a.d[1];
  return r;
}

template <class A, int K> DL_HD Dual<A, K> operator+(const Dual<A, K>& a, const Dual<A, K>& b) {
  Dual<A, K> r;
  r.v = a.v + b.v;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] + b.d[k];
  return r;
}
template <class A, int K> DL_HD Dual<A, K> operator-(const Dual<A, K>& a, const Dual<A, K>& b) {
  Dual<A, K> r;
  r.v = a.v - b.v;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] - b.d[k];
  return r;
}
template <class A, int K> DL_HD Dual<A, K> operator+(const Dual<A, K>& a, A b) {
  Dual<A, K> r = a;
  r.v = a.v + b;
  return r;
}
template <class A, int K> DL_HD Dual<A, K> operator-(const Dual<A, K>& a, A b) { return a + (-b); }
template <class A, int K> DL_HD Dual<A, K> operator-(A a, const Dual<A, K>& b) {
  Dual<A, K> r;
  r.v = a - b.v;
  for (int k = 0; k < K; ++k) r.d[k] = -b.d[k];
  return r;
}
template <class A, int K> DL_HD Dual<A, K> operator-(const Dual<A, K>& a) {
  Dual<A, K> r;
  r.v = -a.v;
  for (int k = 0; k < K; ++k) r.d[k] = -a.d[k];
  return r;
}
template <class A, int K> DL_HD Dual<A, K> operator*(const Dual<A, K>& a, A b) {
  Dual<A, K> r;
  r.v = a.v * b;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * b;
  return r;
}
template <class A, int K> DL_HD Dual<A, K> operator*(const Dual<A, K>& a, const Dual<A, K>& b) {
  Dual<A, K> r;
  r.v = a.v * b.v;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * b.v + a.v * b.d[k];
  return r;
}
template <class A, int K> DL_HD Dual<A, K> operator/(const Dual<A, K>& a, A b) {
  Dual<A, K> r;
  r.v = a.v / b;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] / b;
  return r;
}
template <class A, int K> DL_HD Dual<A, K> operator/(const Dual<A, K>& a, const Dual<A, K>& b) {
  Dual<A, K> r;
  r.v = a.v / b.v;
  for (int k = 0; k < K; ++k) r.d[k] = (a.d[k] - r.v * b.d[k]) / b.v;
  return r;
}
// An x-axis quantity times a y-axis one (an area): the product over the 4 coordinates.
template <class A> DL_HD D4<A> outer(const D2<A>& x, const D2<A>& y) {
  D4<A> r;
  r.v = x.v * y.v;
  r.d[0] = x.d[0] * y.v;
  r.d[1] = x.v * y.d[0];
  r.d[2] = x.d[1] * y.v;
  r.d[3] = x.v * y.d[1];
  return r;
}
// An x-axis quantity over a y-axis one (an aspect ratio).
template <class A> DL_HD D4<A> ratio(const D2<A>& x, const D2<A>& y) {
  D4<A> r;
  r.v = x.v / y.v;
  r.d[0] = x.d[0] / y.v;
  r.d[1] = -r.v * y.d[0] / y.v;
  r.d[2] = x.d[1] / y.v;
  r.d[3] = -r.v * y.d[1] / y.v;
  return r;
}

// torch.max(a, b) and torch.min(a, b): NaN propagates; at a tie each side gets half the gradient.
// Written as arithmetic on 0/1 values rather than chains of selects, which GCC merges into mixed
// boolean operations that it cannot vectorize.
template <class A, int K> DL_HD Dual<A, K> dual_max(const Dual<A, K>& a, const Dual<A, K>& b) {
  const A wa = A(0.5) + A(0.5) * (A(a.v > b.v) - A(a.v < b.v));
  Dual<A, K> r;
  r.v = a.v == a.v ? (a.v > b.v ? a.v : b.v) : a.v;
  for (int k = 0; k < K; ++k) r.d[k] = wa * a.d[k] + (A(1) - wa) * b.d[k];
  return r;
}
template <class A, int K> DL_HD Dual<A, K> dual_min(const Dual<A, K>& a, const Dual<A, K>& b) {
  const A wa = A(0.5) + A(0.5) * (A(a.v < b.v) - A(a.v > b.v));
  Dual<A, K> r;
  r.v = a.v == a.v ? (a.v < b.v ? a.v : b.v) : a.v;
  for (int k = 0; k < K; ++k) r.d[k] = wa * a.d[k] + (A(1) - wa) * b.d[k];
  return r;
}
// clamp(a, lo, hi): the gradient passes where lo <= a <= hi, bounds included (torch's rule).
template <class A, int K> DL_HD Dual<A, K> dual_clamp(const Dual<A, K>& a, A lo, A hi) {
  const A pass = (a.v >= lo && a.v <= hi) ? A(1) : A(0);
  Dual<A, K> r;
  r.v = a.v < lo ? lo : (a.v > hi ? hi : a.v);
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * pass;
  return r;
}
template <class A, int K> DL_HD Dual<A, K> dual_clamp_min(const Dual<A, K>& a, A lo) {
  const A pass = a.v >= lo ? A(1) : A(0);
  Dual<A, K> r;
  r.v = a.v < lo ? lo : a.v;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * pass;
  return r;
}
template <class A, int K> DL_HD Dual<A, K> dual_atan(const Dual<A, K>& a) {
  const A s = A(1) / (A(1) + a.v * a.v);
  Dual<A, K> r;
  r.v = dl_atan(a.v);
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * s;
  return r;
}
template <class A, int K> DL_HD Dual<A, K> dual_log(const Dual<A, K>& a) {
  Dual<A, K> r;
  r.v = dl_log(a.v);
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] / a.v;
  return r;
}

template <class A, int K> DL_HD Dual<A, K> dual_exp(const Dual<A, K>& a) {
  Dual<A, K> r;
  r.v = dl_exp(a.v);
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * r.v;
  return r;
}
// torch.pow(a, 0.5), which torch computes as sqrt, with pow's backward 0.5 a^-0.5 (its rsqrt).
template <class A, int K> DL_HD Dual<A, K> dual_sqrt(const Dual<A, K>& a) {
  const A r_v = dl_sqrt(a.v);
  const A s = A(0.5) * (A(1) / r_v);
  Dual<A, K> r;
  r.v = r_v;
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * s;
  return r;
}
// torch.abs: the gradient is sign(a), 0 at 0.
template <class A, int K> DL_HD Dual<A, K> dual_abs(const Dual<A, K>& a) {
  const A s = dl_sign(a.v);
  Dual<A, K> r;
  r.v = dl_abs(a.v);
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * s;
  return r;
}
template <class A, int K> DL_HD Dual<A, K> dual_asin(const Dual<A, K>& a) {
  const A s = A(1) / dl_sqrt(A(1) - a.v * a.v);
  Dual<A, K> r;
  r.v = dl_asin(a.v);
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * s;
  return r;
}
template <class A, int K> DL_HD Dual<A, K> dual_cos(const Dual<A, K>& a) {
  const A s = -dl_sin(a.v);
  Dual<A, K> r;
  r.v = dl_cos(a.v);
  for (int k = 0; k < K; ++k) r.d[k] = a.d[k] * s;
  return r;
}
// where(take_b, b, a): the taken side's value and gradient, as torch.where; a blend by 0/1 (which
// vectorizes) for finite sides.
template <class A, int K> DL_HD Dual<A, K> dual_select(bool take_b, const Dual<A, K>& b, const Dual<A, K>& a) {
  const A w = A(take_b);
  Dual<A, K> r;
  r.v = b.v * w + a.v * (A(1) - w);
  for (int k = 0; k < K; ++k) r.d[k] = b.d[k] * w + a.d[k] * (A(1) - w);
  return r;
}

// One axis of a box pair, as MMDetection's IoU functions compute it: pred's extent hi - lo, the
// overlap min(hi) - max(lo) and the enclosing extent max(hi) - min(lo), both clamped at 0, and the
// difference of the centre sums (t_lo + t_hi) - (p_lo + p_hi).
template <class A> struct Axis {
  D2<A> extent, overlap, enclose, centre;
  A target_extent;
  DL_HD Axis(A p_lo, A p_hi, A t_lo, A t_hi) {
    const D2<A> lo = axis_var(p_lo, 0), hi = axis_var(p_hi, 1);
    const D2<A> tlo = dual_const<A, 2>(t_lo), thi = dual_const<A, 2>(t_hi);
    extent = hi - lo;
    target_extent = t_hi - t_lo;
    overlap = dual_clamp_min(dual_min(hi, thi) - dual_max(lo, tlo), A(0));
    enclose = dual_clamp_min(dual_max(hi, thi) - dual_min(lo, tlo), A(0));
    centre = A(t_lo + t_hi) - (lo + hi);
  }
};

// The x and y axes of a box pair and the areas built from them.
template <class A> struct BoxPair {
  Axis<A> x, y;
  D4<A> pred_area, overlap;
  A target_area;
  DL_HD BoxPair(const A (&p)[4], const A (&t)[4])
      : x(p[0], p[2], t[0], t[2]),
        y(p[1], p[3], t[1], t[3]),
        pred_area(outer(x.extent, y.extent)),
        overlap(outer(x.overlap, y.overlap)),
        target_area(x.target_extent * y.target_extent) {}
  // bbox_overlaps' enclosing area, ew * eh.
  DL_HD D4<A> enclose_area() const { return outer(x.enclose, y.enclose); }
  // DIoU's and CIoU's squared centre distance over the squared enclosing diagonal (+ eps).
  DL_HD D4<A> distance_term(A eps) const {
    const D2<A> cx = x.centre * x.centre, cy = y.centre * y.centre;
    const D4<A> rho2 = on_axis(cx / A(4), 0) + on_axis(cy / A(4), 1);
    const D4<A> c2 = on_axis(x.enclose * x.enclose, 0) + on_axis(y.enclose * y.enclose, 1) + eps;
    return rho2 / c2;
  }
};

// Writes a Dual<A, 4>'s gradient and returns its value.
template <class A> DL_HD A dual_out(const D4<A>& r, A (&g)[4]) {
  for (int k = 0; k < 4; ++k) g[k] = r.d[k];
  return r.v;
}

DL_NAMESPACE_END
