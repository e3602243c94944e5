// The C ABI of tch_detloss::dist over libtorch's own c10d: TCPStore, ProcessGroup with the Gloo
// and NCCL backends, the collectives and their Work, and DDP's c10d::Reducer. No gloo, NCCL or
// CUDA header here (internal.h says where those are). Tensors cross as at::Tensor*, which is
// what tch calls C_tensor*. Every entry point returns 0 or -1 with a message in `err`.
#include "internal.h"

#include <algorithm>
#include <limits>
#include <memory>
#include <unordered_map>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/headeronly/version.h>

// c10d's C++ API (the Reducer constructor above all) is internal to torch and changes between
// releases; this file follows torch 2.11's nn/parallel/distributed.py and distributed_c10d.py.
static_assert(TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 11,
              "kernels/c10d/c10d.cpp follows libtorch 2.11's c10d");

using dl_c10d::guarded;

namespace {

struct Store {
  c10::intrusive_ptr<c10d::Store> p;
};
struct Group {
  c10::intrusive_ptr<c10d::ProcessGroup> p;
};
struct Job {
  c10::intrusive_ptr<c10d::Work> p;
};
struct Ddp {
  std::shared_ptr<c10d::Reducer> p;
  c10::intrusive_ptr<c10d::ProcessGroup> group;  // the reducer's hooks use it until it goes
};

std::vector<at::Tensor> tensors(void* const* ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(ts[i] != nullptr, "tensor ", i, " is null");
    v.push_back(*static_cast<const at::Tensor*>(ts[i]));  // shares the storage
  }
  return v;
}

std::chrono::milliseconds millis(int64_t ms) { return std::chrono::milliseconds(ms); }

c10d::ReduceOp reduce_op(int op) {
  // SUM, AVG, PRODUCT, MIN, MAX, and BAND for the cross-rank check of dist.rs.
  TORCH_CHECK(op >= 0 && op <= 5, "unknown reduce op ", op);
  return c10d::ReduceOp(static_cast<c10d::ReduceOp::RedOpType>(op));
}

// torch.distributed's key layout: the default group's store is PrefixStore("0/", store) and each
// backend's is PrefixStore("<device>/", that).
constexpr const char* kGroupName = "0";

}  // namespace

#ifndef DL_C10D_NCCL
c10::intrusive_ptr<c10d::Backend> dl_c10d::make_nccl(const c10::intrusive_ptr<c10d::Store>&, int,
                                                     int, int, std::chrono::milliseconds) {
  TORCH_CHECK(false,
              "this build of tch-detloss has no NCCL backend: build.rs found no nccl.h beside the "
              "CUDA headers (scripts/setup.sh installs them)");
}
#endif

extern "C" {

// A TCPStore client, or its server when `is_server` (which waits for `world_size - 1` clients
// when `wait_workers`), with the options torch.distributed's env:// rendezvous uses.
int dl_c10d_tcp_store(const char* host, uint16_t port, int world_size, int is_server,
                      int wait_workers, int64_t timeout_ms, void** out, char* err, size_t len) {
  return guarded(err, len, [&] {
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = is_server != 0;
    o.numWorkers = static_cast<size_t>(world_size);
    o.waitWorkers = wait_workers != 0;
    o.timeout = millis(timeout_ms);
    o.multiTenant = true;
    o.useLibUV = true;
    *out = new Store{c10::make_intrusive<c10d::TCPStore>(std::string(host), o)};
  });
}

int dl_c10d_prefix_store(const char* prefix, const void* base, void** out, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto b = static_cast<const Store*>(base);
    *out = new Store{c10::make_intrusive<c10d::PrefixStore>(prefix, b->p)};
  });
}

// store.add(key, delta): the counter's new value.
int dl_c10d_store_add(void* store, const char* key, int64_t delta, int64_t* value, char* err,
                      size_t len) {
  return guarded(err, len, [&] { *value = static_cast<Store*>(store)->p->add(key, delta); });
}

void dl_c10d_store_free(void* store) {
  try {
    delete static_cast<Store*>(store);
  } catch (...) {
  }
}

// A process group over `store`, as init_process_group builds it: Gloo for CPU tensors (and CUDA
// ones too when there is no NCCL) when `gloo`, NCCL for CUDA tensors on `device` when `nccl`.
int dl_c10d_group_new(const void* store, int rank, int size, int gloo, int nccl, int device,
                      const char* gloo_host, int64_t timeout_ms, void** out, char* err, size_t len) {
  return guarded(err, len, [&] {
    TORCH_CHECK(gloo || nccl, "a process group needs a backend");
    auto root = static_cast<const Store*>(store)->p;
    auto gstore = c10::make_intrusive<c10d::PrefixStore>(std::string(kGroupName) + "/", root);
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(gstore, rank, size);
    using T = c10d::ProcessGroup::BackendType;
    pg->setDefaultBackend(gloo ? T::GLOO : T::NCCL);
    if (gloo) {
      auto be = dl_c10d::make_gloo(c10::make_intrusive<c10d::PrefixStore>("cpu/", gstore), rank,
                                   size, gloo_host ? gloo_host : "", millis(timeout_ms));
      pg->setBackend(c10::DeviceType::CPU, T::GLOO, be);
      if (!nccl) pg->setBackend(c10::DeviceType::CUDA, T::GLOO, be);
    }
    if (nccl) {
      pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
      auto be = dl_c10d::make_nccl(c10::make_intrusive<c10d::PrefixStore>("cuda/", gstore), rank,
                                   size, device, millis(timeout_ms));
      pg->setBackend(c10::DeviceType::CUDA, T::NCCL, be);
    }
    pg->setGroupName(kGroupName);
    *out = new Group{pg};
  });
}

void dl_c10d_group_free(void* group) {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}

// The collectives start their work and return it; dl_c10d_work_wait ends it.
int dl_c10d_all_reduce(void* group, void* const* ts, size_t n, int op, int coalesced, void** work,
                       char* err, size_t len) {
  return guarded(err, len, [&] {
    auto pg = static_cast<Group*>(group)->p;
    auto v = tensors(ts, n);
    if (coalesced) {
      c10d::AllreduceCoalescedOptions o;
      o.reduceOp = reduce_op(op);
      *work = new Job{pg->allreduce_coalesced(v, o)};
    } else {
      c10d::AllreduceOptions o;
      o.reduceOp = reduce_op(op);
      *work = new Job{pg->allreduce(v, o)};
    }
  });
}

int dl_c10d_broadcast(void* group, void* const* ts, size_t n, int root, void** work, char* err,
                      size_t len) {
  return guarded(err, len, [&] {
    auto v = tensors(ts, n);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    *work = new Job{static_cast<Group*>(group)->p->broadcast(v, o)};
  });
}

// `outs` (one per rank, shaped as `input`) receive every rank's `input`.
int dl_c10d_all_gather(void* group, void* const* outs, size_t n, void* input, void** work,
                       char* err, size_t len) {
  return guarded(err, len, [&] {
    std::vector<std::vector<at::Tensor>> o{tensors(outs, n)};
    auto in = tensors(&input, 1);
    *work = new Job{static_cast<Group*>(group)->p->allgather(o, in)};
  });
}

int dl_c10d_barrier(void* group, void** work, char* err, size_t len) {
  return guarded(err, len, [&] { *work = new Job{static_cast<Group*>(group)->p->barrier()}; });
}

// Waits at most `timeout_ms` (0: the group's timeout). On CUDA with NCCL, waiting makes the
// current stream wait for the collective; the host does not.
int dl_c10d_work_wait(void* work, int64_t timeout_ms, char* err, size_t len) {
  return guarded(err, len, [&] {
    static_cast<Job*>(work)->p->wait(timeout_ms > 0 ? millis(timeout_ms) : ::kNoTimeout);
  });
}

void dl_c10d_work_free(void* work) {
  try {
    delete static_cast<Job*>(work);
  } catch (...) {
  }
}

// c10d::broadcast_coalesced from `root`, blocking: DDP's parameter and buffer sync.
int dl_c10d_broadcast_coalesced(void* group, void* const* ts, size_t n, int64_t bucket_bytes,
                                int root, char* err, size_t len) {
  return guarded(err, len, [&] {
    at::NoGradGuard no_grad;  // the tensors are leaves that require grad
    auto v = tensors(ts, n);
    c10d::broadcast_coalesced(static_cast<Group*>(group)->p, v, static_cast<size_t>(bucket_bytes),
                              root);
  });
}

// DistributedDataParallel.__init__ of torch 2.11 without the module: verify the parameters
// across processes, broadcast them from rank 0, assign the buckets and build the reducer.
// `cap_default`: the cap is DDP's default (bucket_cap_mb=None), which adds a first bucket of
// 1 MiB when `find_unused`.
int dl_c10d_reducer_new(void* group, void* const* params, size_t n, int64_t bucket_cap_bytes,
                        int cap_default, int find_unused, int grad_as_bucket_view, void** out, char* err,
                        size_t len) {
  return guarded(err, len, [&] {
    auto pg = static_cast<Group*>(group)->p;
    auto p = tensors(params, n);
    c10d::verify_params_across_processes(pg, p, std::nullopt);
    {
      at::NoGradGuard no_grad;
      c10d::broadcast_coalesced(pg, p, 250u * 1024 * 1024, 0);
    }
    std::vector<size_t> limits;
    if (!find_unused) {
      limits = {std::numeric_limits<size_t>::max()};
    } else if (cap_default) {
      limits = {size_t(c10d::kDefaultFirstBucketBytes), size_t(bucket_cap_bytes)};
    } else {
      limits = {size_t(bucket_cap_bytes)};
    }
    std::vector<bool> sparse(n, false);
    auto assigned = c10d::compute_bucket_assignment_by_size(p, limits, sparse);
    auto buckets = std::get<0>(assigned);
    std::reverse(buckets.begin(), buckets.end());
    auto r = std::make_shared<c10d::Reducer>(
        p, std::move(buckets), pg, sparse, bucket_cap_bytes, find_unused != 0,
        grad_as_bucket_view != 0, std::unordered_map<size_t, std::string>{},
        cap_default ? int64_t(c10d::kDefaultFirstBucketBytes) : bucket_cap_bytes,
        /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
        std::vector<int64_t>{});
    *out = new Ddp{r, pg};
  });
}

// Before each forward pass that a synchronised backward follows (DDP._pre_forward).
int dl_c10d_reducer_prepare_forward(void* ddp, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto& r = static_cast<Ddp*>(ddp)->p;
    r->prepare_for_forward();
    if (at::GradMode::is_enabled()) r->rebuild_buckets();
  });
}

// After the forward pass, before backward (DDP._post_forward): `outputs` lead to the parameters
// that take part, which find_unused_parameters needs.
int dl_c10d_reducer_prepare_backward(void* ddp, void* const* outputs, size_t n, char* err,
                                     size_t len) {
  return guarded(err, len,
                 [&] { static_cast<Ddp*>(ddp)->p->prepare_for_backward(tensors(outputs, n)); });
}

void dl_c10d_reducer_free(void* ddp) {
  try {
    delete static_cast<Ddp*>(ddp);  // ~Reducer may throw
  } catch (...) {
  }
}

// c10d::kDefaultBucketBytesCap, DDP's bucket_cap_mb = 25 in bytes.
int64_t dl_c10d_default_bucket_cap(void) { return c10d::kDefaultBucketBytesCap; }

}  // extern "C"
