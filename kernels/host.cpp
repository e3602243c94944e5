// CPU entry point of one loss: its kernel body run by the host executor. build.rs compiles this
// file once per loss of kernels/losses.def (DL_HOST_LOSS names it) and instruction set (DL_ISA),
// so that the compilers run side by side; the symbol is dl_host_run_<isa>_<loss>.
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
float atanf(float) noexcept __attribute__((simd("notinbranch")));
float asinf(float) noexcept __attribute__((simd("notinbranch")));
float sinf(float) noexcept __attribute__((simd("notinbranch")));
float cosf(float) noexcept __attribute__((simd("notinbranch")));
double exp(double) noexcept __attribute__((simd("notinbranch")));
double log(double) noexcept __attribute__((simd("notinbranch")));
double pow(double, double) noexcept __attribute__((simd("notinbranch")));
double atan(double) noexcept __attribute__((simd("notinbranch")));
double asin(double) noexcept __attribute__((simd("notinbranch")));
double sin(double) noexcept __attribute__((simd("notinbranch")));
double cos(double) noexcept __attribute__((simd("notinbranch")));
}
#endif

#ifndef DL_ISA
#define DL_ISA base
#endif
#ifndef DL_HOST_LOSS
#error "DL_HOST_LOSS must name a loss of kernels/losses.def"
#endif
#define DL_CAT2(a, b) a##b
#define DL_CAT(a, b) DL_CAT2(a, b)
#define DL_ABI DL_CAT(isa_, DL_ISA)

#include "dispatch.cuh"
#include "executor_host.h"

namespace {

template <class T> int64_t run_loss(int32_t pass, const dl::Args& a) {
  using A = typename dl::host::AccOf<T>::type;
#define DL_RUN(...) dl::host::run<__VA_ARGS__, T>(pass, a)
  return DL_CAT(DL_DISPATCH_, DL_HOST_LOSS)(a, A, DL_RUN);
#undef DL_RUN
}

}  // namespace

// Runs one pass. Returns the number of rows with an invalid label (>= 0), or -1 with a message
// in err. No exception crosses this boundary.
extern "C" int64_t DL_CAT(DL_CAT(DL_CAT(dl_host_run_, DL_ISA), _), DL_HOST_LOSS)(int32_t pass, int32_t dtype,
                                                                                  const dl::Args* a, char* err,
                                                                                  size_t errlen) {
  try {
    int64_t r;
    switch (dtype) {
      case dl::DT_F32: r = run_loss<float>(pass, *a); break;
      case dl::DT_F64: r = run_loss<double>(pass, *a); break;
      case dl::DT_F16: r = run_loss<c10::Half>(pass, *a); break;
      case dl::DT_BF16: r = run_loss<c10::BFloat16>(pass, *a); break;
      default: r = -2;
    }
    if (r == -2) {
      std::snprintf(err, errlen, "no CPU kernel for dtype %d with these target and weight modes", int(dtype));
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
