// CPU entry point: the loss bodies of focal.cuh, quality_focal.cuh and varifocal.cuh run by the
// host executor. build.rs compiles this file once per ISA level (DL_ISA names the symbol).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#if defined(DL_SIMD_MATH) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// glibc's libmvec has vector variants of these; declaring them `simd` lets GCC vectorize the
// element loops without -ffast-math (results are those of the scalar functions to the last bit).
extern "C" {
float expf(float) noexcept __attribute__((simd("notinbranch")));
float logf(float) noexcept __attribute__((simd("notinbranch")));
float powf(float, float) noexcept __attribute__((simd("notinbranch")));
double exp(double) noexcept __attribute__((simd("notinbranch")));
double log(double) noexcept __attribute__((simd("notinbranch")));
double pow(double, double) noexcept __attribute__((simd("notinbranch")));
}
#endif

#ifndef DL_ISA
#define DL_ISA base
#endif
#define DL_CAT2(a, b) a##b
#define DL_CAT(a, b) DL_CAT2(a, b)
#define DL_ABI DL_CAT(isa_, DL_ISA)

#include "dispatch.cuh"
#include "executor_host.h"

namespace {

template <class T> int64_t run_loss(int32_t loss, int32_t pass, const dl::Args& a) {
  using A = typename dl::host::AccOf<T>::type;
#define DL_RUN_HOST(...) dl::host::run<__VA_ARGS__, T>(pass, a)
  DL_DISPATCH_LOSS(loss, a, A, DL_RUN_HOST, return -2);
#undef DL_RUN_HOST
}

}  // namespace

// Runs one pass. Returns the number of rows with an invalid label (>= 0), or -1 with a message
// in err. No exception crosses this boundary.
extern "C" int64_t DL_CAT(dl_host_run_, DL_ISA)(int32_t loss, int32_t pass, int32_t dtype,
                                                  const dl::Args* a, char* err, size_t errlen) {
  try {
    int64_t r;
    switch (dtype) {
      case dl::DT_F32: r = run_loss<float>(loss, pass, *a); break;
      case dl::DT_F64: r = run_loss<double>(loss, pass, *a); break;
      case dl::DT_F16: r = run_loss<c10::Half>(loss, pass, *a); break;
      case dl::DT_BF16: r = run_loss<c10::BFloat16>(loss, pass, *a); break;
      default: r = -2;
    }
    if (r == -2) {
      std::snprintf(err, errlen, "unknown loss %d or dtype %d", int(loss), int(dtype));
      return -1;
    }
    return r;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
  } catch (...) {
    std::snprintf(err, errlen, "unknown C++ exception in the CPU executor");
  }
  return -1;
}
