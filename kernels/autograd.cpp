// The autograd bridge: a torch::autograd::Node whose backward is a Rust callback.
//
// tch has no custom autograd functions. This node holds an opaque Rust state plus two callbacks
// (backward and drop); dl_autograd_attach wires it to the inputs' gradient edges and makes it the
// grad_fn of the outputs. Ownership: the node owns the state and drops it exactly once (when
// autograd releases the saved variables after a backward without retain_graph, or when the node
// dies). No C++ exception and no Rust panic crosses this boundary.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdio>
#include <mutex>
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
  void release_variables() override { drop_state(); }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> g(mu);
    if (!state) {
      throw std::runtime_error(node_name +
                               ": trying to backward through the graph a second time (or directly access "
                               "saved tensors after they have already been freed); call backward with "
                               "retain_graph=true the first time");
    }
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
                                  size_t n_outputs, void* state, dl_backward_fn backward, dl_drop_fn drop,
                                  int* recorded, char* err, size_t errlen) {
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
