// The autograd bridge: a torch::autograd::Node whose backward is a Rust callback.
//
// tch has no custom autograd functions. This node holds an opaque Rust state plus two callbacks
// (backward and drop); dl_autograd_attach wires it to the inputs' gradient edges and makes it the
// grad_fn of the outputs. Ownership: the node owns the state and drops it exactly once (when
// autograd releases the saved variables after a backward without retain_graph, or when the node
// dies). No C++ exception and no Rust panic crosses this boundary.
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <cstdio>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// Returns 0 and fills grads_out[0..n_out) with owned tensors (or null for no gradient), or
// non-zero with a message in err. grads_in are owned by the callee.
typedef int (*dl_backward_fn)(void* state, at::Tensor** grads_in, size_t n_in, at::Tensor** grads_out,
                              size_t n_out, char* err, size_t errlen);
typedef void (*dl_drop_fn)(void* state);
}

namespace {

constexpr size_t ERR_LEN = 4096;

struct RustNode final : public torch::autograd::Node {
  std::string node_name;
  std::mutex mu;
  void* state;
  dl_backward_fn backward_fn;
  dl_drop_fn drop_fn;
  // The tensors backward reads, with the version each had when recorded: autograd's own
  // mechanism, so an in-place change after the forward pass fails backward with torch's words.
  std::vector<torch::autograd::SavedVariable> saved;

  RustNode(std::string name, void* st, dl_backward_fn bw, dl_drop_fn dr)
      : node_name(std::move(name)), state(st), backward_fn(bw), drop_fn(dr) {}

  ~RustNode() override { drop_state(); }

  std::string name() const override { return node_name; }

  void drop_state() {
    std::lock_guard<std::mutex> g(mu);
    if (state) {
      drop_fn(state);
      state = nullptr;
    }
  }

  // Called by the engine after a backward without retain_graph: free what the Rust side saved.
  void release_variables() override {
    drop_state();
    std::lock_guard<std::mutex> g(mu);
    for (auto& s : saved) s.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> g(mu);
    if (!state) {
      throw std::runtime_error(node_name +
                               ": trying to backward through the graph a second time (or directly access "
                               "saved tensors after they have already been freed); call backward with "
                               "retain_graph=true the first time");
    }
    for (auto& s : saved) (void)s.unpack();  // throws torch's in-place modification error
    std::vector<at::Tensor*> in(grads.size());
    for (size_t i = 0; i < grads.size(); ++i) {
      // An output that did not reach the loss has an undefined gradient: hand over zeros, as
      // PyTorch's custom functions do by default.
      in[i] = new at::Tensor(grads[i].defined() ? grads[i] : input_metadata(i).zeros_like());
    }
    const size_t n_out = num_outputs();
    std::vector<at::Tensor*> out(n_out, nullptr);
    char err[ERR_LEN];
    err[0] = 0;
    int rc = backward_fn(state, in.data(), in.size(), out.data(), n_out, err, ERR_LEN);
    torch::autograd::variable_list result(n_out);
    for (size_t i = 0; i < n_out; ++i) {
      if (out[i]) {
        result[i] = std::move(*out[i]);
        delete out[i];
      }
    }
    if (rc != 0) throw std::runtime_error(node_name + " backward: " + std::string(err));
    return result;
  }
};

}  // namespace

// Makes a node owning `state` the grad_fn of outputs[0..n_outputs) with edges to inputs. When no
// input requires grad (or grad mode is off) the state is dropped at once and nothing is recorded;
// *recorded tells which. Returns 0, or non-zero with a message in err (the state is then dropped).
extern "C" int dl_autograd_attach(const char* name, at::Tensor** inputs, size_t n_inputs, at::Tensor** outputs,
                                  size_t n_outputs, at::Tensor** saved, size_t n_saved, void* state,
                                  dl_backward_fn backward, dl_drop_fn drop, int* recorded, char* err,
                                  size_t errlen) {
  *recorded = 0;
  try {
    torch::autograd::variable_list ins;
    ins.reserve(n_inputs);
    for (size_t i = 0; i < n_inputs; ++i) ins.push_back(*inputs[i]);
    if (!torch::autograd::GradMode::is_enabled() || !torch::autograd::compute_requires_grad(ins)) {
      drop(state);
      return 0;
    }
    std::shared_ptr<RustNode> node(new RustNode(name, state, backward, drop), torch::autograd::deleteNode);
    state = nullptr;  // owned by the node from here on
    node->set_next_edges(torch::autograd::collect_next_edges(ins));
    node->saved.reserve(n_saved);
    for (size_t i = 0; i < n_saved; ++i) node->saved.emplace_back(*saved[i], /*is_output=*/false);
    for (size_t i = 0; i < n_outputs; ++i) {
      at::Tensor& out = *outputs[i];
      if (out.requires_grad()) throw std::runtime_error("output " + std::to_string(i) + " already has a grad_fn");
      torch::autograd::set_history(out, node);
    }
    *recorded = 1;
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
  } catch (...) {
    std::snprintf(err, errlen, "unknown C++ exception");
  }
  if (state) drop(state);
  return 1;
}

// Whether autograd records operations on this thread (tch exposes only the setter).
extern "C" int dl_grad_enabled() { return torch::autograd::GradMode::is_enabled() ? 1 : 0; }

// Why tch-detloss cannot take a tensor, or 0 where it can: defined, strided, on the CPU or CUDA,
// not quantized, not nested. tch reports neither layouts nor device types beyond CPU, CUDA, MPS
// and Vulkan (a meta tensor reads as MPS) and panics on several of these; we say what it is.
extern "C" int dl_tensor_unsupported(const at::Tensor* t, char* err, size_t errlen) {
  try {
    std::ostringstream why;
    if (!t->defined()) {
      why << "an undefined tensor";
    } else if (!t->device().is_cpu() && !t->device().is_cuda()) {
      why << "on device " << t->device() << "; only CPU and CUDA tensors are supported";
    } else if (t->is_nested()) {
      why << "a nested tensor; pass a strided (dense) tensor";
    } else if (t->layout() != c10::kStrided) {
      why << "a tensor with layout " << t->layout() << "; pass a strided (dense) tensor, e.g. with to_dense()";
    } else if (t->is_quantized()) {
      why << "a quantized tensor (" << t->scalar_type() << "); dequantize it first";
    } else if (!t->has_storage()) {
      why << "a tensor without storage";
    } else {
      return 0;
    }
    std::snprintf(err, errlen, "%s", why.str().c_str());
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "a tensor that cannot be inspected: %s", e.what());
  } catch (...) {
    std::snprintf(err, errlen, "a tensor that cannot be inspected");
  }
  return 1;
}

// A meta tensor (shape and kind, no data) like t, for tests of the checks above; null on error.
extern "C" at::Tensor* dl_meta_like(const at::Tensor* t) {
  try {
    return new at::Tensor(at::empty(t->sizes(), t->options().device(c10::kMeta)));
  } catch (...) {
    return nullptr;
  }
}
