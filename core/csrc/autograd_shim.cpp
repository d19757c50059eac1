// A bridge from Rust to `torch::autograd::Function`: tch exposes no custom autograd, so this
// file defines one Function whose forward and backward are Rust callbacks, plus the few
// libtorch calls the Rust side needs around it (RNG state, multi-output backward, grad mode).
//
// Every entry point is `extern "C"`, never lets a C++ exception escape (the error text is
// returned as a malloc'd string the caller frees with lmms_shim_free_str), and exchanges
// tensors as `at::Tensor*` -- the same representation tch's `C_tensor` uses.

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

extern "C" {
// Rust callbacks. They return 0 on success; on failure they write a message into `err`
// (a std::string*, through lmms_shim_string_set) and return non-zero.
typedef int (*lmms_forward_cb)(void *state, at::Tensor *const *inputs, int64_t n_inputs,
                               void *outputs, void *err);
typedef int (*lmms_backward_cb)(void *state, at::Tensor *const *inputs, int64_t n_inputs,
                                at::Tensor *const *grads, int64_t n_grads, void *grad_inputs,
                                void *err);
typedef void (*lmms_drop_cb)(void *state);
}

namespace {

char *dup_message(const char *msg) {
  size_t n = std::strlen(msg);
  char *out = static_cast<char *>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, msg, n + 1);
  }
  return out;
}

// Owns the Rust backward closure; stored in the node's saved_data, so the closure lives
// exactly as long as the graph that may call it.
struct RustBackward : torch::CustomClassHolder {
  void *state;
  lmms_backward_cb backward;
  lmms_drop_cb drop;
  RustBackward(void *s, lmms_backward_cb b, lmms_drop_cb d) : state(s), backward(b), drop(d) {}
  ~RustBackward() override {
    if (drop != nullptr) {
      drop(state);
    }
  }
};

struct ForwardCall {
  void *state;
  lmms_forward_cb forward;
};

std::vector<at::Tensor *> pointers(at::TensorList tensors) {
  std::vector<at::Tensor *> out;
  out.reserve(tensors.size());
  for (const auto &t : tensors) {
    out.push_back(const_cast<at::Tensor *>(&t));
  }
  return out;
}

struct RustFunction : public torch::autograd::Function<RustFunction> {
  // `inputs` must be a TensorList: Function::apply only sees tensors in Tensor and
  // TensorList arguments (a std::vector is taken for a non-tensor and nothing is recorded).
  static variable_list forward(AutogradContext *ctx, at::TensorList inputs, ForwardCall call,
                               c10::intrusive_ptr<RustBackward> backward) {
    variable_list outputs;
    std::string err;
    auto ptrs = pointers(inputs);
    if (call.forward(call.state, ptrs.data(), static_cast<int64_t>(ptrs.size()), &outputs,
                     &err) != 0) {
      throw std::runtime_error(err);
    }
    ctx->save_for_backward(inputs.vec());
    ctx->saved_data["rust_backward"] = at::IValue::make_capsule(std::move(backward));
    return outputs;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto holder = c10::static_intrusive_pointer_cast<RustBackward>(
        ctx->saved_data["rust_backward"].toCapsule());
    auto inputs = ctx->get_saved_variables();
    variable_list grad_inputs;
    std::string err;
    auto in_ptrs = pointers(inputs);
    auto grad_ptrs = pointers(grads);
    if (holder->backward(holder->state, in_ptrs.data(), static_cast<int64_t>(in_ptrs.size()),
                         grad_ptrs.data(), static_cast<int64_t>(grad_ptrs.size()),
                         &grad_inputs, &err) != 0) {
      throw std::runtime_error(err);
    }
    if (grad_inputs.size() != inputs.size()) {
      throw std::runtime_error("custom autograd backward returned " +
                               std::to_string(grad_inputs.size()) + " gradients for " +
                               std::to_string(inputs.size()) + " inputs");
    }
    // One (undefined) gradient for each non-tensor argument of forward: call and backward.
    grad_inputs.emplace_back();
    grad_inputs.emplace_back();
    return grad_inputs;
  }
};

at::Generator default_generator(int device_type, int64_t index) {
  if (device_type == 0) {
    return at::globalContext().defaultGenerator(at::Device(at::kCPU));
  }
  return at::globalContext().defaultGenerator(
      at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index)));
}

} // namespace

extern "C" {

void lmms_shim_free_str(char *s) { std::free(s); }

void lmms_shim_string_set(void *err, const char *msg, size_t len) {
  static_cast<std::string *>(err)->assign(msg, len);
}

// Appends a copy of `t` (an undefined tensor when null) to a variable_list.
void lmms_shim_list_push(void *list, at::Tensor *t) {
  auto *v = static_cast<variable_list *>(list);
  v->push_back(t == nullptr ? at::Tensor() : *t);
}

int lmms_shim_grad_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

// Moves `t`'s accumulated `.grad` out (PyTorch's `p.grad = None` after reading it): returns a
// new heap tensor, or null when no gradient reached `t`.
at::Tensor* lmms_shim_take_grad(at::Tensor* t) {
  at::Tensor& slot = t->mutable_grad();
  if (!slot.defined()) return nullptr;
  at::Tensor* out = new at::Tensor(std::move(slot));
  slot.reset();
  return out;
}

// Applies the Rust-backed Function. Ownership of `bwd_state` passes to the C++ side in every
// case (it is dropped through `drop` when the graph node dies, or at once when nothing is
// recorded or the call fails). On success writes `*n_out` new heap tensors into `out`
// (allocated here with malloc, each element owned by the caller; the array is freed with
// lmms_shim_free_array).
char *lmms_shim_apply(at::Tensor *const *inputs, int64_t n_inputs, void *fwd_state,
                      lmms_forward_cb fwd, void *bwd_state, lmms_backward_cb bwd,
                      lmms_drop_cb drop, at::Tensor ***out, int64_t *n_out) {
  try {
    auto holder = c10::make_intrusive<RustBackward>(bwd_state, bwd, drop);
    variable_list in;
    in.reserve(static_cast<size_t>(n_inputs));
    for (int64_t i = 0; i < n_inputs; ++i) {
      in.push_back(*inputs[i]);
    }
    variable_list result = RustFunction::apply(at::TensorList(in), ForwardCall{fwd_state, fwd},
                                               std::move(holder));
    auto **arr = static_cast<at::Tensor **>(std::malloc(sizeof(at::Tensor *) * (result.size() + 1)));
    if (arr == nullptr) {
      return dup_message("out of memory");
    }
    for (size_t i = 0; i < result.size(); ++i) {
      arr[i] = new at::Tensor(std::move(result[i]));
    }
    *out = arr;
    *n_out = static_cast<int64_t>(result.size());
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

void lmms_shim_free_array(at::Tensor **arr) { std::free(arr); }

// `torch::autograd::backward(outputs, grads)`: accumulates into the `.grad` of every leaf
// reached, which is how parameters captured by a checkpointed closure get their gradients.
char *lmms_shim_backward(at::Tensor *const *outputs, at::Tensor *const *grads, int64_t n) {
  try {
    variable_list outs, gs;
    for (int64_t i = 0; i < n; ++i) {
      outs.push_back(*outputs[i]);
      gs.push_back(*grads[i]);
    }
    torch::autograd::backward(outs, gs, /*retain_graph=*/false, /*create_graph=*/false);
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// device_type: 0 = CPU, 1 = CUDA (with `index`). Returns the generator state as a new tensor.
char *lmms_shim_rng_get(int device_type, int64_t index, at::Tensor **state) {
  try {
    auto gen = default_generator(device_type, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    *state = new at::Tensor(gen.get_state());
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

char *lmms_shim_rng_set(int device_type, int64_t index, at::Tensor *state) {
  try {
    auto gen = default_generator(device_type, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*state);
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

} // extern "C"
