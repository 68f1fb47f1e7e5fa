// Python bindings of upfirdn2d.cu (called from the torch.library op in upfirdn2d.py).

#include <torch/extension.h>

namespace next3d {
at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& f, int64_t upx, int64_t upy, int64_t downx, int64_t downy,
                          int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1, bool flip_filter, double gain);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("upfirdn2d", &next3d::upfirdn2d_cuda,
          "Zero-insert upsample, pad, 2-D FIR filter (true convolution unless flip_filter), decimate",
          pybind11::arg("x"), pybind11::arg("f"), pybind11::arg("upx"), pybind11::arg("upy"), pybind11::arg("downx"),
          pybind11::arg("downy"), pybind11::arg("padx0"), pybind11::arg("padx1"), pybind11::arg("pady0"),
          pybind11::arg("pady1"), pybind11::arg("flip_filter"), pybind11::arg("gain"));
}
