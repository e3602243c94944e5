// What we need from libtorch's CUDA side, behind a C ABI: torch's current stream (so that our
// launches are ordered with libtorch's work and captured with it in a CUDA graph), the caching
// allocator's byte counters (for the profile's peak memory) and c10's sync-debug mode (to prove
// that a training step reads nothing back). Built only when the CUDA headers are available.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/cuda/memory_snapshot.h>

#include <cstdio>
#include <exception>
#include <string>

// From libtorch_cuda (ATen/cuda/CUDAContextLight.h, whose other includes need the cuBLAS and
// cuSPARSE headers). Calling it does more than check the kernels' assumption: it makes every
// binary that uses the CUDA path reference libtorch_cuda, so the linker keeps that library
// even under --as-needed (tch-rs #907, #980) without a link argument of the user's own.
namespace at {
namespace cuda {
int warp_size();
}
}  // namespace at

extern "C" int dl_cuda_warp_size() {
  try {
    return at::cuda::warp_size();
  } catch (...) {
    return -1;
  }
}

extern "C" void* dl_current_cuda_stream(int device) {
  try {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
  } catch (...) {
    return nullptr;
  }
}

// Bytes allocated through the caching allocator on `device`: now and peak since the last reset.
// Returns 0 and fills both, or -1 (e.g. CUDA not initialized).
extern "C" int dl_cuda_allocated_bytes(int device, int64_t* current, int64_t* peak) {
  try {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto& a = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    *current = a.current;
    *peak = a.peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

extern "C" int dl_cuda_reset_peak_bytes(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

// The caching allocator's counters of a device, aggregated over pools: allocated, reserved and
// active bytes (current, peak each), allocation retries and out-of-memory errors, in that order
// into out[8]. Returns 0, or -1.
extern "C" int dl_cuda_memory_stats(int device, int64_t* out) {
  try {
    const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[agg].current;
    out[1] = s.allocated_bytes[agg].peak;
    out[2] = s.reserved_bytes[agg].current;
    out[3] = s.reserved_bytes[agg].peak;
    out[4] = s.active_bytes[agg].current;
    out[5] = s.active_bytes[agg].peak;
    out[6] = s.num_alloc_retries;
    out[7] = s.num_ooms;
    return 0;
  } catch (...) {
    return -1;
  }
}

// Returns the cached, unused blocks to the driver.
extern "C" int dl_cuda_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Starts (or stops) recording the allocator's history with C++ stacks, as PyTorch's
// torch.cuda.memory._record_memory_history() does.
extern "C" int dl_cuda_record_memory_history(int enabled) {
  try {
    if (enabled)
      torch::cuda::_record_memory_history(std::optional<std::string>("all"), std::optional<std::string>("all"), "all");
    else
      torch::cuda::_record_memory_history(std::nullopt);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Writes the allocator's snapshot (with the recorded history) to `path` in the pickle format
// that PyTorch's memory viewer (pytorch.org/memory_viz) opens.
extern "C" int dl_cuda_memory_snapshot(const char* path) {
  try {
    const std::string pickled = torch::cuda::_memory_snapshot_pickled();
    FILE* f = std::fopen(path, "wb");
    if (!f) return -1;
    const size_t written = std::fwrite(pickled.data(), 1, pickled.size(), f);
    const bool ok = std::fclose(f) == 0 && written == pickled.size();
    return ok ? 0 : -1;
  } catch (...) {
    return -1;
  }
}

// c10's CUDA sync-debug mode (0 off, 1 warn, 2 error: an operation that synchronizes with the
// host then warns or throws). Returns the previous mode, or -1.
extern "C" int dl_cuda_set_sync_debug_mode(int mode) {
  try {
    if (mode < 0 || mode > 2) return -1;
    auto& state = c10::cuda::warning_state();
    const int previous = static_cast<int>(state.get_sync_debug_mode());
    state.set_sync_debug_mode(static_cast<c10::cuda::SyncDebugMode>(mode));
    return previous;
  } catch (...) {
    return -1;
  }
}
