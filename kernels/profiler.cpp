// The profiler shim: libtorch's Kineto profiler (start, stop, the Chrome/Perfetto trace and the
// events), named ranges (at::RecordFunction) and the CUDA allocator's memory history and
// snapshot, behind a C ABI for src/profiler.rs. Built with the other shims by build.rs; the CPU
// part works on any machine, the CUDA part reports a clear error where CUDA is absent.
//
// No exception crosses this boundary: each entry point returns 0, or -1 with a message in err.
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <set>
#include <string>

namespace {

namespace prof = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

void set_err(char* err, size_t len, const char* msg) {
  if (err && len) std::snprintf(err, len, "%s", msg);
}

template <class F> int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
  } catch (...) {
    set_err(err, len, "unknown C++ exception");
  }
  return -1;
}

// The result of the last stop, kept until the next start so that Rust can read its events.
std::unique_ptr<prof::ProfilerResult> last_result;

}  // namespace

// Starts the Kineto profiler on the calling thread: CPU activities always, CUDA ones with
// `cuda`; input shapes and memory events on request.
extern "C" int dl_profiler_start(int cuda, int shapes, int memory, char* err, size_t len) {
  return guarded(err, len, [&] {
    last_result.reset();
    std::set<impl::ActivityType> acts{impl::ActivityType::CPU};
    if (cuda) acts.insert(impl::ActivityType::CUDA);
    impl::ProfilerConfig config(impl::ProfilerState::KINETO, shapes != 0, memory != 0);
    prof::prepareProfiler(config, acts);
    prof::enableProfiler(config, acts);
  });
}

// Stops it, writes the trace to `path` (when not null) and returns the number of events.
extern "C" int64_t dl_profiler_stop(const char* path, char* err, size_t len) {
  int64_t n = -1;
  int rc = guarded(err, len, [&] {
    last_result = prof::disableProfiler();
    if (!last_result) throw std::runtime_error("the profiler was not running on this thread");
    if (path) last_result->save(path);
    n = static_cast<int64_t>(last_result->events().size());
  });
  return rc == 0 ? n : -1;
}

// Event `i` of the last stopped run: its name (copied into `name`, truncated to `name_len`),
// device type (0 CPU, 1 CUDA, as c10::DeviceType), start and duration in ns, start thread and
// nesting-relevant flags.
extern "C" int dl_profiler_event(int64_t i, char* name, size_t name_len, int32_t* device_type, int64_t* start_ns,
                                 int64_t* duration_ns, uint64_t* thread, int32_t* is_async, char* err, size_t len) {
  return guarded(err, len, [&] {
    if (!last_result) throw std::runtime_error("no profiler result");
    const auto& ev = last_result->events();
    if (i < 0 || static_cast<size_t>(i) >= ev.size()) throw std::out_of_range("event index out of range");
    const auto& e = ev[static_cast<size_t>(i)];
    const std::string nm = e.name();
    std::snprintf(name, name_len, "%s", nm.c_str());
    *device_type = static_cast<int32_t>(e.deviceType());
    *start_ns = static_cast<int64_t>(e.startNs());
    *duration_ns = static_cast<int64_t>(e.durationNs());
    *thread = e.startThreadId();
    *is_async = e.isAsync() ? 1 : 0;
  });
}

// A user range: at::RecordFunction with `name`, ended (and freed) by dl_range_end. Returns null
// where no profiler is listening (the range then costs nothing).
extern "C" void* dl_range_begin(const char* name) {
  try {
    auto rf = std::make_unique<at::RecordFunction>(at::RecordScope::USER_SCOPE);
    if (!rf->isActive()) return nullptr;
    rf->before(std::string_view(name));
    return rf.release();
  } catch (...) {
    return nullptr;
  }
}

extern "C" void dl_range_end(void* handle) {
  if (!handle) return;
  auto* rf = static_cast<at::RecordFunction*>(handle);
  try {
    rf->end();
  } catch (...) {
  }
  delete rf;
}
