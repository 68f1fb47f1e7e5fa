// Python bindings of bias_act.cu (called from the torch.library op in bias_act.py).

#include <torch/extension.h>

#include <optional>

namespace next3d {
at::Tensor bias_act_cuda(const at::Tensor& x, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& dy,
                         int64_t dim, int64_t act, double alpha, double gain, double clamp);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("bias_act", &next3d::bias_act_cuda,
          "clamp(act(x + b) * gain) when dy is None, else its gradient dy * d/dz[...] with z = x + b",
          pybind11::arg("x"), pybind11::arg("b"), pybind11::arg("dy"), pybind11::arg("dim"), pybind11::arg("act"),
          pybind11::arg("alpha"), pybind11::arg("gain"), pybind11::arg("clamp"));
}
