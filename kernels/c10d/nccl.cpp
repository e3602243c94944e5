// The only translation unit that sees ProcessGroupNCCL.hpp (and nccl.h and the CUDA runtime
// headers); built when build.rs finds nccl.h beside the CUDA headers, with -DUSE_C10D_NCCL.
//
// ProcessGroupNCCL::Options embeds nccl.h's ncclConfig_t and this unit allocates it, so nccl.h
// must be the version libtorch_cuda was built with (2.28.9 for torch 2.11): build.rs reads the
// header's version, and make_nccl compares it with libtorch_cuda's own before anything else.
#include "internal.h"

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

namespace torch::cuda::nccl {
TORCH_CUDA_CPP_API std::uint64_t version();  // torch/csrc/cuda/nccl.h, not in the wheel
}

namespace dl_c10d {

c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                            int size, int device, std::chrono::milliseconds timeout) {
  constexpr std::uint64_t ours =
      (std::uint64_t(NCCL_MAJOR) << 32) | (std::uint64_t(NCCL_MINOR) << 16) | std::uint64_t(NCCL_PATCH);
  const std::uint64_t torch_nccl = torch::cuda::nccl::version();
  TORCH_CHECK(torch_nccl == ours, "tch-detloss was built against nccl.h ", NCCL_MAJOR, ".", NCCL_MINOR,
              ".", NCCL_PATCH, " but libtorch_cuda uses NCCL ", torch_nccl >> 32, ".",
              (torch_nccl >> 16) & 0xffff, ".", torch_nccl & 0xffff,
              ": rebuild with the nvidia-nccl wheel that matches torch");
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->is_high_priority_stream = false;
  opts->timeout = timeout;
  std::vector<uint64_t> ranks(size);
  for (int i = 0; i < size; ++i) ranks[i] = i;
  opts->global_ranks_in_group = ranks;
  opts->group_name = "0";
  auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
  backend->setSequenceNumberForGroup();
  // A bound device makes the communicator start now, as init_process_group(device_id=...):
  // a broken NCCL set-up fails here rather than in the first backward pass.
  const at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  backend->setBoundDeviceId(dev);
  backend->eagerConnectSingleDevice(dev);
  return backend;
}

}  // namespace dl_c10d
