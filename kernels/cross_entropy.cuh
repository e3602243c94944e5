// CrossEntropyLoss (mmdet/models/losses/cross_entropy_loss.py).
//
// Softmax (use_sigmoid=False, `cross_entropy`): a row body. Row i's loss is
//   cw[y] * (logsumexp(x_i) - x_i[y])   (F.cross_entropy with class_weight, reduction 'none'),
// 0 where y == ignore_index. A label outside [0, C) other than ignore_index is out of range.
//
// Sigmoid (use_sigmoid=True, `binary_cross_entropy`): an element body,
//   BCE-with-logits(x, t, pos_weight = cw[j]) = (1 - t) x + (1 + (pw - 1) t) softplus(-x),
// with MMDetection's validity mask: an element whose label (class-index targets) or target value
// (dense targets) is negative or equals ignore_index gets weight 0.
//
// Slots: aux = class_weight ([C], or 0 for none); i0 = ignore_index.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct CrossEntropySoftmax : RowBody {
  const A* cw;
  int64_t c, ignore;
  DL_HD explicit CrossEntropySoftmax(const Args& a)
      : cw(reinterpret_cast<const A*>(a.aux)), c(a.c), ignore(a.i0) {}
  DL_HD SparseTarget<A> target(int64_t label, A) const {
    if (label == ignore) return {{0, 0}, {A(0), A(0)}, false, false};
    if (label < 0 || label >= c) return {{0, 0}, {A(0), A(0)}, true, true};
    return {{label, 0}, {cw ? cw[label] : A(1), A(0)}, true, false};
  }
};

template <class A> struct CrossEntropySigmoid : ElementBody {
  static constexpr bool LABEL_TARGETS = true, COLUMN_PARAM = true, IGNORE_INDEX = true;
  DL_HD explicit CrossEntropySigmoid(const Args&) {}
  // -log_sigmoid(x) = softplus(-x) = max(-x, 0) + log1p(exp(-|x|)), as torch computes it.
  DL_HD A loss(A x, A t, A pw) const {
    const A sp = dl_max(-x, A(0)) + dl_log1p(dl_exp(-dl_abs(x)));
    return (A(1) - t) * x + (A(1) + (pw - A(1)) * t) * sp;
  }
  // d/dx: (1 - t) + (1 + (pw - 1) t) (sigmoid(x) - 1).
  DL_HD A grad(A x, A t, A pw) const {
    const A e = dl_exp(-dl_abs(x));
    const A r = A(1) / (A(1) + e);
    const A p = x >= A(0) ? r : e * r;
    return (A(1) - t) + (A(1) + (pw - A(1)) * t) * (p - A(1));
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_cross_entropy(a, A, RUN) \
  (((a).flags & ::dl::FLAG_SIGMOID) ? RUN(::dl::CrossEntropySigmoid<A>) : RUN(::dl::CrossEntropySoftmax<A>))
