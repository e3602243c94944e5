// Which element functor runs for a (loss, flags, parameters) triple: the one table that both
// executors share. RUN(F) must expand to the executor call for functor F.
#pragma once
#include "common.cuh"
#include "focal.cuh"
#include "quality_focal.cuh"
#include "varifocal.cuh"

// Expands RUN for the POW2 specialization when the exponent (p0) is exactly 2 (the default of
// every loss here). The activated (probability) variants are rare and take the general pow.
#define DL_POW2(F, A, RUN) ((a).p0 == 2.0 ? RUN(F<A, true>) : RUN(F<A, false>))

#define DL_DISPATCH_LOSS(loss, a, A, RUN, UNKNOWN)                                                  \
  do {                                                                                              \
    const bool act_ = ((a).flags & ::dl::FLAG_ACTIVATED) != 0;                                      \
    switch (loss) {                                                                                 \
      case ::dl::LOSS_FOCAL:                                                                        \
        return act_ ? RUN(::dl::FocalProb<A, false>) : DL_POW2(::dl::FocalLogits, A, RUN);          \
      case ::dl::LOSS_QFL:                                                                          \
        return act_ ? RUN(::dl::QflProb<A, false>) : DL_POW2(::dl::QflLogits, A, RUN);              \
      case ::dl::LOSS_VFL:                                                                          \
        return DL_POW2(::dl::Varifocal, A, RUN);                                                    \
      default:                                                                                      \
        UNKNOWN;                                                                                    \
    }                                                                                               \
  } while (0)
