// SIMT emulation layer: the real ATen glue (csrc/glue.cpp) with the emulated
// CUDA kernels plugged in, on CPU tensors -- what csrc/cuda/fusedbn_cuda.cpp
// does with the real ones. The kernels live in a torch-free library loaded
// with dlopen (simt_kernels.cpp), so a mutated build only recompiles that.
#include <dlfcn.h>
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "glue.h"

namespace fusedbn {
namespace {

struct Api {
  void* handle = nullptr;
  size_t (*fwd_bytes)(const ForwardParams*, int) = nullptr;
  size_t (*bwd_bytes)(const BackwardParams*) = nullptr;
  int (*fwd)(const ForwardParams*, int, void*) = nullptr;
  int (*bwd)(const BackwardParams*, void*) = nullptr;
  const char* (*message)() = nullptr;
  int (*set)(const char*, long long) = nullptr;
  const char* (*take_log)() = nullptr;
  void (*convert)(const float*, size_t, uint16_t*, uint16_t*, float*, float*) = nullptr;
  int (*selftest)(int, int*) = nullptr;
} api;

template <typename F>
void sym(F& f, const char* name) {
  f = reinterpret_cast<F>(dlsym(api.handle, name));
  TORCH_CHECK(f, "simt: ", name, " not found: ", dlerror());
}

void load_kernels(const std::string& path) {
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(h, "simt: dlopen ", path, ": ", dlerror());
  api.handle = h;
  sym(api.fwd_bytes, "simt_forward_workspace_bytes");
  sym(api.bwd_bytes, "simt_backward_workspace_bytes");
  sym(api.fwd, "simt_forward");
  sym(api.bwd, "simt_backward");
  sym(api.message, "simt_message");
  sym(api.set, "simt_set");
  sym(api.take_log, "simt_take_log");
  sym(api.convert, "simt_convert");
  sym(api.selftest, "simt_selftest");
}

// Host "device memory" for the partials: 0xff bytes (NaN in float and
// double) so a partial read before it is written shows, and a guard after
// the end that must survive the kernels.
struct Workspace {
  static constexpr size_t kGuard = 4096;
  size_t bytes;
  unsigned char* p = nullptr;
  explicit Workspace(size_t n) : bytes(n) {
    p = static_cast<unsigned char*>(std::aligned_alloc(256, (n + kGuard + 255) / 256 * 256));
    std::memset(p, 0xff, n);
    std::memset(p + n, 0xa5, kGuard);
  }
  ~Workspace() { std::free(p); }
  void* ptr() const { return bytes ? p : nullptr; }
  void check() const {
    for (size_t i = 0; i < kGuard; ++i)
      TORCH_CHECK(p[bytes + i] == 0xa5, "simt: the kernels wrote past the workspace's end (",
                  bytes, " bytes) at +", i);
  }
};

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "simt: CUDA ", what, " failed (error ", err, "): ", api.message());
}

void forward_kernel(const ForwardParams& p, bool training) {
  Workspace ws(api.fwd_bytes(&p, training));
  const int err = api.fwd(&p, training, ws.ptr());
  ws.check();
  check(err, "forward");
}

void backward_kernel(const BackwardParams& p) {
  Workspace ws(api.bwd_bytes(&p));
  const int err = api.bwd(&p, ws.ptr());
  ws.check();
  check(err, "backward");
}

}  // namespace
}  // namespace fusedbn

using fusedbn::OptTensor;
using fusedbn::Tensor;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("load_kernels", &fusedbn::load_kernels);
  m.def("set", [](const std::string& key, long long v) {
    TORCH_CHECK(fusedbn::api.set, "simt: no kernels loaded");
    TORCH_CHECK(fusedbn::api.set(key.c_str(), v), "simt: unknown setting ", key);
  });
  m.def("take_log", []() { return std::string(fusedbn::api.take_log()); });
  // (error code, result, message) of the layer's self-test `which`.
  m.def("selftest", [](int which) {
    int result = 0;
    const int err = fusedbn::api.selftest(which, &result);
    return std::make_tuple(err, result, std::string(err ? fusedbn::api.message() : ""));
  });
  // float32 -> (half bits, bfloat16 bits, half -> float, bfloat16 -> float)
  m.def("convert", [](const Tensor& x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 1);
    const int64_t n = x.numel();
    Tensor h = at::empty({n}, at::kShort), b = at::empty({n}, at::kShort);
    Tensor hb = at::empty({n}, at::kFloat), bb = at::empty({n}, at::kFloat);
    fusedbn::api.convert(x.data_ptr<float>(), size_t(n), reinterpret_cast<uint16_t*>(h.data_ptr()),
                         reinterpret_cast<uint16_t*>(b.data_ptr()), hb.data_ptr<float>(),
                         bb.data_ptr<float>());
    return std::make_tuple(h, b, hb, bb);
  });
  namespace py = pybind11;
  m.def("forward",
        [](const Tensor& input, const OptTensor& residual, const OptTensor& weight,
           const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
           const OptTensor& nbt, bool training, std::optional<double> momentum, double eps,
           const std::string& activation, double negative_slope, double alpha, bool inplace,
           const std::string& order, const OptTensor& activity, double activity_momentum,
           double min_val, double max_val, const std::string& approximate) {
          fusedbn::ForwardArgs a;
          a.input = input;
          a.residual = residual;
          a.weight = weight;
          a.bias = bias;
          a.running_mean = running_mean;
          a.running_var = running_var;
          a.num_batches_tracked = nbt;
          a.training = training;
          a.momentum = momentum;
          a.eps = eps;
          a.act = {activation, negative_slope, alpha, min_val, max_val, approximate, order};
          a.activity = activity;
          a.activity_momentum = activity_momentum;
          return fusedbn::forward_impl(a, inplace, &fusedbn::forward_kernel);
        },
        py::arg("input"), py::arg("residual"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("num_batches_tracked"),
        py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("activation"),
        py::arg("negative_slope"), py::arg("alpha"), py::arg("inplace"),
        py::arg("order") = "bn_act", py::arg("activity") = py::none(),
        py::arg("activity_momentum") = 0.1, py::arg("min_val") = -1.0,
        py::arg("max_val") = 1.0, py::arg("approximate") = "none");
  m.def("backward",
        [](const Tensor& grad_out, const Tensor& input, const OptTensor& residual,
           const OptTensor& weight, const OptTensor& bias, const Tensor& save_mean,
           const Tensor& save_invstd, bool training, const std::string& activation,
           double negative_slope, double alpha, std::array<bool, 4> output_mask,
           bool from_output, const OptTensor& kept_input, const OptTensor& kept_channels,
           const std::string& order, double min_val, double max_val,
           const std::string& approximate) {
          fusedbn::BackwardArgs a;
          a.grad_out = grad_out;
          a.input = input;
          a.residual = residual;
          a.weight = weight;
          a.bias = bias;
          a.save_mean = save_mean;
          a.save_invstd = save_invstd;
          a.training = training;
          a.act = {activation, negative_slope, alpha, min_val, max_val, approximate, order};
          a.output_mask = output_mask;
          a.from_output = from_output;
          a.kept_input = kept_input;
          a.kept_channels = kept_channels;
          return fusedbn::backward_impl(a, &fusedbn::backward_kernel);
        },
        py::arg("grad_out"), py::arg("input"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("save_mean"), py::arg("save_invstd"), py::arg("training"),
        py::arg("activation"), py::arg("negative_slope"), py::arg("alpha"),
        py::arg("output_mask"), py::arg("from_output"), py::arg("kept_input"),
        py::arg("kept_channels"), py::arg("order") = "bn_act", py::arg("min_val") = -1.0,
        py::arg("max_val") = 1.0, py::arg("approximate") = "none");
}
