// What the c10d translation units share. No gloo, NCCL or CUDA header here: gloo.cpp is the only
// unit that sees ProcessGroupGloo.hpp and nccl.cpp the only one that sees ProcessGroupNCCL.hpp.
#pragma once
#include <chrono>
#include <cstdio>
#include <string>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace dl_c10d {

// A ready ProcessGroupGloo (gloo.cpp). `hostname`: the address gloo binds to; empty: as torch
// does without one (GLOO_SOCKET_IFNAME, else the host's default device).
c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                            int size, const std::string& hostname,
                                            std::chrono::milliseconds timeout);

// A ready ProcessGroupNCCL bound to CUDA device `device` (nccl.cpp; a clear error in a build
// without NCCL).
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                            int size, int device, std::chrono::milliseconds timeout);

inline void set_err(char* err, size_t len, const char* msg) {
  if (err && len) std::snprintf(err, len, "%s", msg);
}

// Runs `f`, turning every C++ exception into -1 and a message: none may cross the C ABI.
template <class F> int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_err(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
  } catch (...) {
    set_err(err, len, "unknown C++ exception");
  }
  return -1;
}

}  // namespace dl_c10d
