// KnowledgeDistillationKLDivLoss (mmdet/models/losses/kd_loss.py, `knowledge_distillation_kl_div_loss`):
// a scan-row body. With a = pred / T, b = soft_label / T, the teacher's p = softmax(b) (detached)
// and log q = log_softmax(a), row i's loss is
//   kl_div(log q, p, 'none').mean(1) * T^2 = (sum_j p_j (log p_j - log q_j)) / C * T^2,
// with log p_j = b_j - lse(b), so that a p_j that underflows to 0 adds 0 (torch's xlogy). Its
// gradient is d/dpred_j = T / C (q_j sum_k p_k - p_j), with sum_k p_k = 1 (the teacher's
// softmax sums to 1 up to rounding).
//
// Slots: p0 = T.
#pragma once
#include "common.cuh"

DL_NAMESPACE_BEGIN

// The row's arithmetic is double whatever A: the loss is a small difference of large terms
// (p ~ q for a student near its teacher, and T^2 / C scales it), where float32's rounding of the
// two log-sum-exps alone moves a row's loss by a relative 1e-6.
template <class A> struct KnowledgeDistillation : ScanRowBody {
  static constexpr bool LABEL_TARGETS = false;
  double t, tt;
  DL_HD explicit KnowledgeDistillation(const Args& a) : t(a.p0), tt(a.p0 * a.p0) {}
  template <class S> DL_HD RowCheck check(const S&) const { return {true, false}; }
  // The slots of the two softmaxes (s.softmax): the student's q, the teacher's p.
  enum { Q = 0, P = 1 };
  template <class S> DL_HD A forward(const S& s, double* stat) const {
    const auto a = [&](int64_t j) { return double(s.x(j)) / t; };
    const auto b = [&](int64_t j) { return double(s.t(j)) / t; };
    const double lq = s.lse(s.c, a, Q);
    const double lp = s.lse(s.c, b, P);
    const double kl = s.sum(s.c, [&](int64_t j) { return s.softmax(P, j, b, lp) * ((b(j) - lp) - (a(j) - lq)); });
    stat[0] = lq;
    stat[1] = lp;
    return A(kl / double(s.c) * tt);
  }
  template <class S> DL_HD void backward(const S& s, const double* stat, A coef) const {
    const auto a = [&](int64_t j) { return double(s.x(j)) / t; };
    const auto b = [&](int64_t j) { return double(s.t(j)) / t; };
    const double lq = stat[0], lp = stat[1], k = double(coef) * t / double(s.c);
    s.write([&](int64_t j) { return (s.softmax(Q, j, a, lq) - s.softmax(P, j, b, lp)) * k; });
  }
};

DL_NAMESPACE_END

#define DL_DISPATCH_kd(a, A, RUN) RUN(::dl::KnowledgeDistillation<A>)
