// torch's current CUDA stream for a device, so that our launches are ordered with libtorch's
// work (and captured with it in a CUDA graph). Built only when the CUDA headers are available.
#include <c10/cuda/CUDAStream.h>

extern "C" void* dl_current_cuda_stream(int device) {
  try {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
  } catch (...) {
    return nullptr;
  }
}
