// FocalLoss (mmdet/models/losses/focal_loss.py): py_sigmoid_focal_loss and, for
// activated=True, py_focal_loss_with_prob. The focal weight is not detached, as in MMDetection,
// so the gradient includes the derivative of pt^gamma.
//
//   pt   = (1 - p) t + p (1 - t)
//   loss = BCE(x, t) * (alpha t + (1 - alpha)(1 - t)) * pt^gamma
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

// POW2: gamma == 2. p0 = gamma, p1 = alpha.
template <class A, bool POW2> struct FocalLogits : ElementBody {
  static constexpr bool LABEL_TARGETS = true;
  A gamma, alpha;
  DL_HD explicit FocalLogits(const Args& a) : gamma(A(a.p0)), alpha(A(a.p1)) {}
  DL_HD A loss(A x, A t) const {
    Logit<A> s(x, t);
    A pt = (A(1) - s.p) * t + s.p * (A(1) - t);
    A aw = alpha * t + (A(1) - alpha) * (A(1) - t);
    return s.bce * (aw * dl_powe<POW2>(pt, gamma));
  }
  DL_HD A grad(A x, A t) const {
    Logit<A> s(x, t);
    A pt = (A(1) - s.p) * t + s.p * (A(1) - t);
    A aw = alpha * t + (A(1) - alpha) * (A(1) - t);
    A dpt = s.p * (A(1) - s.p) * (A(1) - A(2) * t);
    return (s.p - t) * (aw * dl_powe<POW2>(pt, gamma)) + s.bce * (aw * dl_dpowe<POW2>(pt, gamma) * dpt);
  }
};

// activated=True: x is already a probability.
template <class A, bool POW2> struct FocalProb : ElementBody {
  static constexpr bool LABEL_TARGETS = true;
  A gamma, alpha;
  DL_HD explicit FocalProb(const Args& a) : gamma(A(a.p0)), alpha(A(a.p1)) {}
  DL_HD A loss(A p, A t) const {
    A pt = (A(1) - p) * t + p * (A(1) - t);
    A aw = alpha * t + (A(1) - alpha) * (A(1) - t);
    return prob_guard(p, bce_prob(p, t) * (aw * dl_powe<POW2>(pt, gamma)));
  }
  DL_HD A grad(A p, A t) const {
    A pt = (A(1) - p) * t + p * (A(1) - t);
    A aw = alpha * t + (A(1) - alpha) * (A(1) - t);
    return prob_guard(p, bce_prob_grad(p, t) * (aw * dl_powe<POW2>(pt, gamma)) +
                             bce_prob(p, t) * (aw * dl_dpowe<POW2>(pt, gamma) * (A(1) - A(2) * t)));
  }
};

DL_NAMESPACE_END

// Logits (POW2 when gamma == 2) or, with activated=True, probabilities (the general pow: rare).
#define DL_DISPATCH_focal(a, A, RUN) \
  (((a).flags & ::dl::FLAG_ACTIVATED) ? RUN(::dl::FocalProb<A, false>) : DL_POW2(a, ::dl::FocalLogits, A, RUN))
