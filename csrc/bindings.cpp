// pybind11 bindings of the mdkernels CUDA module. Every function takes raw device pointers (uintptr_t),
// sizes, strides in elements, a dtype code and the caller's CUDA stream; the Python side
// (mdkernels/_cuda_ext.py) validates tensors and wraps each op as a torch.library custom op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "angular_distill.h"
#include "l2norm.h"
#include "margin_ce.h"
#include "margin_target.h"

#ifdef MDK_EMULATE  // the same bindings, run by the CPU emulator (csrc/emu/cuda_emu.h)
#include "emu/emu_control.h"
#define MDK_MODULE_NAME MDK_EMU_MODULE_NAME  // _cuda_emu, or _cuda_emu_asan
#else
#define MDK_MODULE_NAME _cuda
#endif

namespace py = pybind11;

namespace {

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls are not poisoned
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(MDK_MODULE_NAME, m) {
  m.doc() = "mdkernels CUDA C++ kernels (raw pointers + stream; see mdkernels/_cuda_ext.py)";
#ifdef MDK_EMULATE
  mdk_emu::bind_controls(m);
#else
  m.attr("emulated") = false;
#endif
  m.attr("archs") = std::string(MDK_CUDA_ARCHS_STR);
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.attr("kernels") =
      std::vector<std::string>{"l2norm_forward",  "l2norm_backward",   "angular_forward",
                               "angular_backward", "margin_ce_forward", "margin_ce_center_grad",
                               "margin_target_forward"};
  m.attr("margin_tile_classes") = mdk::margin_tile_classes();
  m.def("margin_smem_bytes", [](int dtype, bool forward, int accumulator_columns) {
    return mdk::margin_smem_bytes(static_cast<mdk::DType>(dtype), forward, accumulator_columns);
  }, py::arg("dtype"), py::arg("forward"), py::arg("accumulator_columns"),
        "Dynamic shared memory of a margin-CE block (256 or 128 accumulator columns)");
  m.def("device_count", &device_count, "CUDA devices visible to this module's runtime (0 without a driver)");
  m.def("driver_version", &driver_version,
        "The CUDA version the installed driver supports (12040 = 12.4), 0 without a driver");

  m.def(
      "l2norm_forward",
      [](int dtype, std::uintptr_t x, std::uintptr_t y, std::uintptr_t rnorm, int64_t rows, int64_t dim,
         int64_t xs, int64_t ys, float eps, std::uintptr_t stream) {
        mdk::l2norm_forward(static_cast<mdk::DType>(dtype), ptr<const void>(x), ptr<void>(y), ptr<float>(rnorm),
                            rows, dim, xs, ys, eps, mdk::as_stream(stream));
      },
      py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("rnorm"), py::arg("rows"), py::arg("dim"),
      py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("eps"), py::arg("stream"));

  m.def(
      "l2norm_backward",
      [](int dtype, bool dy_f32, std::uintptr_t x, std::uintptr_t dy, std::uintptr_t dx, int64_t rows,
         int64_t dim, int64_t xs, int64_t dys, int64_t dxs, float eps, std::uintptr_t stream) {
        mdk::l2norm_backward(static_cast<mdk::DType>(dtype), dy_f32, ptr<const void>(x), ptr<const void>(dy),
                             ptr<void>(dx), rows, dim, xs, dys, dxs, eps, mdk::as_stream(stream));
      },
      py::arg("dtype"), py::arg("dy_is_float32"), py::arg("x"), py::arg("dy"), py::arg("dx"), py::arg("rows"),
      py::arg("dim"), py::arg("x_row_stride"), py::arg("dy_row_stride"), py::arg("dx_row_stride"), py::arg("eps"),
      py::arg("stream"));

  auto margin_args = [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t rx, std::uintptr_t rw,
                        std::uintptr_t labels, int64_t B, int64_t C, int64_t D, const std::vector<int64_t>& strides,
                        float s, float tau, bool has_filter, float bound) {
    if (strides.size() != 4) throw std::invalid_argument("strides must be (x row, x col, w row, w col)");
    return mdk::MarginArgs{ptr<const void>(x), ptr<const void>(w), ptr<const float>(rx), ptr<const float>(rw),
                           ptr<const int64_t>(labels), B, C, D, strides[0], strides[2], strides[1], strides[3], s,
                           tau, has_filter, bound};
  };

  m.def(
      "margin_ce_forward",
      [margin_args](int dtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t rx, std::uintptr_t rw,
                    std::uintptr_t labels, std::uintptr_t m_out, std::uintptr_t l_out, std::uintptr_t o_out, int64_t B,
                    int64_t C, int64_t D, const std::vector<int64_t>& strides, int64_t splits, int64_t per_split,
                    float s, float tau, bool has_filter, float bound, std::uintptr_t stream) {
        mdk::margin_ce_forward(static_cast<mdk::DType>(dtype),
                               margin_args(x, w, rx, rw, labels, B, C, D, strides, s, tau, has_filter, bound),
                               ptr<float>(m_out), ptr<float>(l_out), ptr<float>(o_out), splits, per_split,
                               mdk::as_stream(stream));
      },
      py::arg("dtype"), py::arg("x"), py::arg("w"), py::arg("rx"), py::arg("rw"), py::arg("labels"), py::arg("m_out"),
      py::arg("l_out"), py::arg("o_out"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("strides"),
      py::arg("splits"), py::arg("per_split"), py::arg("s"), py::arg("tau"),
      py::arg("has_filter"), py::arg("bound"), py::arg("stream"));

  m.def(
      "margin_ce_center_grad",
      [margin_args](int dtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t rx, std::uintptr_t rw,
                    std::uintptr_t labels, std::uintptr_t lse, std::uintptr_t gr, std::uintptr_t coef,
                    std::uintptr_t gscale, std::uintptr_t dw, int64_t B, int64_t C, int64_t D,
                    const std::vector<int64_t>& strides, int64_t sdw, int64_t sdwc, float s, float tau,
                    bool has_filter, float bound, std::uintptr_t stream) {
        mdk::margin_ce_center_grad(static_cast<mdk::DType>(dtype),
                                   margin_args(x, w, rx, rw, labels, B, C, D, strides, s, tau, has_filter, bound),
                                   ptr<const float>(lse), ptr<const float>(gr), ptr<const float>(coef),
                                   ptr<const float>(gscale), ptr<void>(dw), sdw, sdwc, mdk::as_stream(stream));
      },
      py::arg("dtype"), py::arg("x"), py::arg("w"), py::arg("rx"), py::arg("rw"), py::arg("labels"), py::arg("lse"),
      py::arg("gr"), py::arg("coef"), py::arg("gscale"), py::arg("dw"), py::arg("B"), py::arg("C"), py::arg("D"),
      py::arg("strides"), py::arg("dw_row_stride"), py::arg("dw_col_stride"), py::arg("s"), py::arg("tau"),
      py::arg("has_filter"), py::arg("bound"), py::arg("stream"));

  m.def(
      "margin_target_forward",
      [](int dtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t labels, std::uintptr_t rx, std::uintptr_t rw,
         std::uintptr_t m2, std::uintptr_t m3, std::uintptr_t raw, std::uintptr_t z, std::uintptr_t slope, int64_t B,
         int64_t D, const std::vector<int64_t>& strides, float s, float m1, bool fallback, bool straight_through,
         std::uintptr_t stream) {
        if (strides.size() != 4) throw std::invalid_argument("strides must be (x row, x col, w row, w col)");
        const mdk::MarginTargetArgs a{ptr<const void>(x), ptr<const void>(w), ptr<const int64_t>(labels),
                                      ptr<const float>(rx), ptr<const float>(rw), ptr<const float>(m2),
                                      ptr<const float>(m3), ptr<float>(raw), ptr<float>(z), ptr<float>(slope), B, D,
                                      strides[0], strides[1], strides[2], strides[3], s, m1, fallback,
                                      straight_through};
        mdk::margin_target_forward(static_cast<mdk::DType>(dtype), a, mdk::as_stream(stream));
      },
      py::arg("dtype"), py::arg("x"), py::arg("w"), py::arg("labels"), py::arg("rx"), py::arg("rw"), py::arg("m2"),
      py::arg("m3"), py::arg("raw"), py::arg("z"), py::arg("slope"), py::arg("B"), py::arg("D"), py::arg("strides"),
      py::arg("s"), py::arg("m1"), py::arg("fallback"), py::arg("straight_through"), py::arg("stream"));

  m.def(
      "angular_forward",
      [](int dtype, std::uintptr_t s, std::uintptr_t t, std::uintptr_t loss, std::uintptr_t ns, std::uintptr_t nt,
         std::uintptr_t cos, int64_t rows, int64_t dim, int64_t ss, int64_t ts, float p, std::uintptr_t stream) {
        mdk::angular_forward(static_cast<mdk::DType>(dtype), ptr<const void>(s), ptr<const void>(t), ptr<float>(loss),
                             ptr<float>(ns), ptr<float>(nt), ptr<float>(cos), rows, dim, ss, ts, p,
                             mdk::as_stream(stream));
      },
      py::arg("dtype"), py::arg("s"), py::arg("t"), py::arg("loss"), py::arg("ns"), py::arg("nt"), py::arg("cos"),
      py::arg("rows"), py::arg("dim"), py::arg("s_row_stride"), py::arg("t_row_stride"), py::arg("p"),
      py::arg("stream"));

  m.def(
      "angular_backward",
      [](int dtype, std::uintptr_t s, std::uintptr_t t, std::uintptr_t g, std::uintptr_t ns, std::uintptr_t nt,
         std::uintptr_t cos, std::uintptr_t ds, int64_t rows, int64_t dim, int64_t ss, int64_t ts, float p,
         std::uintptr_t stream) {
        mdk::angular_backward(static_cast<mdk::DType>(dtype), ptr<const void>(s), ptr<const void>(t),
                              ptr<const float>(g), ptr<const float>(ns), ptr<const float>(nt), ptr<const float>(cos),
                              ptr<void>(ds), rows, dim, ss, ts, p, mdk::as_stream(stream));
      },
      py::arg("dtype"), py::arg("s"), py::arg("t"), py::arg("g"), py::arg("ns"), py::arg("nt"), py::arg("cos"),
      py::arg("ds"), py::arg("rows"), py::arg("dim"), py::arg("s_row_stride"), py::arg("t_row_stride"), py::arg("p"),
      py::arg("stream"));
}
