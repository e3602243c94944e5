// GHMC (mmdet/models/losses/ghm_loss.py): BCE-with-logits on the histogram executor. An element's
// gradient norm g = |sigmoid(x) - t| places it in a bin; where its label weight is > 0 its weight
// is tot / (elements in its bin, or the momentum average), divided by the number of non-empty
// bins; elsewhere 0. tot = max(#elements with label weight > 0, 1) is the divisor of 'mean'.
// The bin weights carry no gradient (MMDetection detaches g).
//
// Slots: none (bins, momentum and the last edge are the histogram executor's).
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct Ghmc : ElementBody {
  static constexpr bool LABEL_TARGETS = true, HISTOGRAM = true;
  DL_HD explicit Ghmc(const Args&) {}
  DL_HD A loss(A x, A t) const { return Logit<A>(x, t).bce; }
  DL_HD A grad(A x, A t) const { return Logit<A>(x, t).p - t; }
  DL_HD A hist_g(A x, A t) const { return dl_abs(Logit<A>(x, t).p - t); }
};

DL_NAMESPACE_END

#define DL_DISPATCH_ghmc(a, A, RUN) RUN(::dl::Ghmc<A>)
