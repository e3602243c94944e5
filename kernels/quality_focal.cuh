// QualityFocalLoss (mmdet/models/losses/gfocal_loss.py): quality_focal_loss,
// quality_focal_loss_with_prob and quality_focal_loss_tensor_target.
//
// MMDetection computes BCE(x, 0) * sigma^beta everywhere and then overwrites the positive entries
// with BCE(x, score) * |score - sigma|^beta. With t = 0 off the positives, both are the single
// expression BCE(x, t) * |t - sigma|^beta (|0 - sigma| = sigma), value and gradient alike. The
// executor sums the class axis (the loss is per anchor).
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

// POW2: beta == 2. p0 = beta.
template <class A, bool POW2> struct QflLogits : ElementBody {
  static constexpr bool LABEL_TARGETS = true, ELEMENT_WEIGHTS = false;
  A beta;
  DL_HD explicit QflLogits(const Args& a) : beta(A(a.p0)) {}
  DL_HD A loss(A x, A t) const {
    Logit<A> s(x, t);
    return s.bce * dl_powe<POW2>(dl_abs(s.p - t), beta);
  }
  DL_HD A grad(A x, A t) const {
    Logit<A> s(x, t);
    A d = s.p - t;
    return (s.p - t) * dl_powe<POW2>(dl_abs(d), beta) +
           s.bce * (dl_dpowe<POW2>(dl_abs(d), beta) * dl_sign(d) * (s.p * (A(1) - s.p)));
  }
};

// activated=True: x is already a probability.
template <class A, bool POW2> struct QflProb : ElementBody {
  static constexpr bool LABEL_TARGETS = true, ELEMENT_WEIGHTS = false;
  A beta;
  DL_HD explicit QflProb(const Args& a) : beta(A(a.p0)) {}
  DL_HD A loss(A p, A t) const { return prob_guard(p, bce_prob(p, t) * dl_powe<POW2>(dl_abs(p - t), beta)); }
  DL_HD A grad(A p, A t) const {
    A d = p - t;
    return prob_guard(p, bce_prob_grad(p, t) * dl_powe<POW2>(dl_abs(d), beta) +
                             bce_prob(p, t) * (dl_dpowe<POW2>(dl_abs(d), beta) * dl_sign(d)));
  }
};

DL_NAMESPACE_END

// Logits (POW2 when beta == 2) or, with activated=True, probabilities (the general pow: rare).
#define DL_DISPATCH_quality_focal(a, A, RUN) \
  (((a).flags & ::dl::FLAG_ACTIVATED) ? RUN(::dl::QflProb<A, false>) : DL_POW2(a, ::dl::QflLogits, A, RUN))
