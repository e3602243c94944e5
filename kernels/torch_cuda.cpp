// What we need from libtorch's CUDA side, behind a C ABI: torch's current stream (so that our
// launches are ordered with libtorch's work and captured with it in a CUDA graph), the caching
// allocator's byte counters (for the profile's peak memory) and c10's sync-debug mode (to prove
// that a training step reads nothing back). Built only when the CUDA headers are available.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

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
