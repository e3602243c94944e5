// Which functor runs for a (loss, flags, parameters) triple: the one table that both executors
// share. Each kernel body kernels/<name>.cuh defines DL_DISPATCH_<name>(a, A, RUN) for its own
// loss; kernels/losses.def lists the losses, and build.rs writes dl_bodies.inc (on the include
// path of every compilation) with one #include per listed body. The caller defines DL_RUN(...) to
// expand to the executor call for the functor it is given.
#pragma once
#include "common.cuh"
#include "losses.def"

#include "dl_bodies.inc"

#define DL_DISPATCH_CASE_(name, id, stages) \
  case id:                                  \
    return DL_DISPATCH_##name(a_, DlAcc_, DL_RUN);

// `loss` is a run-time id: every listed loss is compiled in.
#define DL_DISPATCH_LOSS(loss, a, A, UNKNOWN) \
  do {                                        \
    const ::dl::Args& a_ = (a);               \
    using DlAcc_ = A;                         \
    switch (loss) {                           \
      DL_LOSSES(DL_DISPATCH_CASE_)            \
      default:                                \
        UNKNOWN;                              \
    }                                         \
  } while (0)
