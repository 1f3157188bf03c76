// Python binding of fastkd's CUDA backend (module fastkd._C, or fastkd_cuda when JIT-built).
#include <torch/extension.h>

void kd_forward(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& labels,
                const c10::optional<at::Tensor>& row_count, double inv_count, const at::Tensor& edges, at::Tensor loss,
                const c10::optional<at::Tensor>& grad_s, const c10::optional<at::Tensor>& grad_t,
                const c10::optional<at::Tensor>& meter_s, const c10::optional<at::Tensor>& meter_t,
                double inv_temp, double kd_scale, double ce_scale, double beta, int64_t divergence,
                int64_t ignore_index, bool has_ce, int64_t num_bins, double grad_unit);
void scale_grad(at::Tensor grad, const at::Tensor& factor);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kd_forward", &kd_forward, "fused KD loss, gradients and calibration statistics (rows (N, C))");
  m.def("scale_grad", &scale_grad, "grad *= factor in place, skipped on the device where factor is 1");
}
