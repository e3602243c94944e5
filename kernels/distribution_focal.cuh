// DistributionFocalLoss (mmdet/models/losses/gfocal_loss.py, `distribution_focal_loss`): a row
// body over the reg_max + 1 bins. With y the target distance, l = trunc(y) (`label.long()`),
//   loss = CE(x, l) (l + 1 - y) + CE(x, l + 1) (y - l).
// A target outside [0, reg_max) is out of range (MMDetection's indexing fails there).
//
// Slots: none.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

template <class A> struct DistributionFocal : RowBody {
  static constexpr bool LABEL_TARGETS = false;
  A reg_max;
  DL_HD explicit DistributionFocal(const Args& a) : reg_max(A(a.c - 1)) {}
  DL_HD SparseTarget<A> target(int64_t, A y) const {
    if (!(y >= A(0) && y < reg_max)) return {{0, 0}, {A(0), A(0)}, true, true};
    const int64_t l = int64_t(y);
    return {{l, l + 1}, {A(l + 1) - y, y - A(l)}, true, false};
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_distribution_focal(a, A, RUN) RUN(::dl::DistributionFocal<A>)
