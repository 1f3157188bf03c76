// fastkd's CUDA backend, host side: the checks and scalars of a call, then the launch (kd_launch.h;
// the kernels are in kd_device.cuh, the layout arithmetic in launch_limits.h, host-only and tested
// on a CPU). Light headers only: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "kd_device.cuh"
#include "kd_launch.h"
#include "launch_limits.h"

namespace fastkd {

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

}  // namespace fastkd

namespace {

namespace dev = fastkd::device;

template <typename T>
T* ptr_or_null(const c10::optional<at::Tensor>& x) {
  return x.has_value() && x->defined() ? static_cast<T*>(x->data_ptr()) : nullptr;
}

void check_on_device(const c10::optional<at::Tensor>& x, const at::Device& device, const char* name) {
  if (x.has_value() && x->defined())
    TORCH_CHECK(x->device() == device, "fastkd cuda backend: ", name, " is on ", x->device(),
                ", the logits on ", device);
}

// Calls f(E*) with the element type of a dtype (a null pointer as a tag).
template <typename F>
void with_element_type(at::ScalarType type, const char* name, F&& f) {
  switch (type) {
    case at::kFloat:
      return f(static_cast<float*>(nullptr));
    case at::kHalf:
      return f(static_cast<__half*>(nullptr));
    case at::kBFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    default:
      TORCH_CHECK(false, "fastkd cuda backend: ", name, " must be float32, float16 or bfloat16, got ", type);
  }
}

// A base address in elements of its tensor (vector accesses need it divisible by their width).
uint64_t misalignment(const at::Tensor& x) {
  return reinterpret_cast<uintptr_t>(x.data_ptr()) / static_cast<uint64_t>(x.element_size());
}

}  // namespace

void kd_forward(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& labels,
                const c10::optional<at::Tensor>& row_count, double inv_count, const at::Tensor& edges, at::Tensor loss,
                const c10::optional<at::Tensor>& grad_s, const c10::optional<at::Tensor>& grad_t,
                const c10::optional<at::Tensor>& meter_s, const c10::optional<at::Tensor>& meter_t,
                double inv_temp, double kd_scale, double ce_scale, double beta, int64_t divergence,
                int64_t ignore_index, bool has_ce, int64_t num_bins, double grad_unit) {
  TORCH_CHECK(s.is_cuda() && t.is_cuda(), "fastkd cuda backend: tensors must be on a CUDA device");
  TORCH_CHECK(s.dim() == 2 && t.sizes() == s.sizes(), "fastkd cuda backend: logits must be (N, C), the same shape");
  TORCH_CHECK(s.stride(1) == 1 && t.stride(1) == 1, "fastkd cuda backend: rows must be contiguous");
  TORCH_CHECK(s.size(1) < (int64_t{1} << 30), "fastkd cuda backend: too many classes");
  const at::Device device = s.device();
  TORCH_CHECK(t.device() == device, "fastkd cuda backend: teacher logits on ", t.device(), ", student on ", device);
  check_on_device(labels, device, "labels");
  check_on_device(row_count, device, "row_count");
  check_on_device(grad_s, device, "grad_s");
  check_on_device(grad_t, device, "grad_t");
  check_on_device(meter_s, device, "meter");
  check_on_device(meter_t, device, "teacher_meter");
  check_on_device(edges, device, "the bin edges");
  check_on_device(loss, device, "loss");
  for (const auto* g : {&grad_s, &grad_t})
    if (g->has_value()) TORCH_CHECK((*g)->stride(1) == 1, "fastkd cuda backend: gradients must have contiguous rows");
  if (grad_s.has_value()) TORCH_CHECK(grad_s->scalar_type() == s.scalar_type(), "fastkd cuda backend: grad_s dtype");
  if (grad_t.has_value()) TORCH_CHECK(grad_t->scalar_type() == t.scalar_type(), "fastkd cuda backend: grad_t dtype");
  const c10::cuda::OptionalCUDAGuard guard(device);  // launches and queries below go to `device`

  fastkd::KdLaunch l;
  l.device = device.index();
  l.stream = c10::cuda::getCurrentCUDAStream(l.device);
  l.num_bins = num_bins;
  dev::Params& p = l.p;
  p.n_rows = s.size(0);
  p.n_cols = static_cast<int>(s.size(1));
  p.stride_s = s.stride(0);
  p.stride_t = t.stride(0);
  p.stride_gs = grad_s.has_value() ? grad_s->stride(0) : 0;
  p.stride_gt = grad_t.has_value() ? grad_t->stride(0) : 0;
  p.inv_temp = static_cast<float>(inv_temp);
  p.k_temp = static_cast<float>(1.4426950408889634 * inv_temp);
  p.kd_scale = static_cast<float>(kd_scale);
  p.ce_scale = static_cast<float>(ce_scale);
  p.beta = static_cast<float>(beta);
  p.ignore_index = ignore_index;
  p.labels = ptr_or_null<const int64_t>(labels);
  p.row_count = ptr_or_null<const int64_t>(row_count);
  p.inv_count = static_cast<float>(inv_count);
  p.grad_unit = static_cast<float>(grad_unit);
  p.num_bins = static_cast<int>(num_bins);
  p.edges = edges.data_ptr<float>();
  p.loss = loss.data_ptr<float>();
  p.meter_s = ptr_or_null<double>(meter_s);
  p.meter_t = ptr_or_null<double>(meter_t);
  dev::Flags& f = p.flags;
  f.divergence = static_cast<int>(divergence);
  f.has_labels = p.labels != nullptr;
  f.has_ce = has_ce;
  f.same_temp = inv_temp == 1.0;  // then k_temp is log2(e) exactly, as the T = 1 sums use
  f.grad_s = grad_s.has_value();
  f.grad_t = grad_t.has_value();
  f.meter_s = p.meter_s != nullptr;
  f.meter_t = p.meter_t != nullptr;
  f.count_on_device = p.row_count != nullptr;
  if (p.n_rows == 0) return;

  // the layout: vector width from every stride and address, then rows per thread group
  const int widest = static_cast<int>(std::max(s.element_size(), t.element_size()));
  const int64_t strides[] = {p.stride_s, p.stride_t, p.stride_gs, p.stride_gt};
  uint64_t unaligned = misalignment(s) | misalignment(t);
  if (grad_s.has_value()) unaligned |= misalignment(*grad_s);
  if (grad_t.has_value()) unaligned |= misalignment(*grad_t);
  l.vec = fastkd::vector_width(p.n_cols, widest, strides, 4, unaligned);
  l.smem = fastkd::meter_smem_bytes(num_bins, (f.meter_s ? 1 : 0) + (f.meter_t ? 1 : 0), sizeof(uint32_t));

  with_element_type(s.scalar_type(), "student_logits", [&](auto* s_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    with_element_type(t.scalar_type(), "teacher_logits", [&](auto* t_tag) {
      using T = std::remove_pointer_t<decltype(t_tag)>;
      const auto* s_ptr = static_cast<const S*>(s.data_ptr());
      const auto* t_ptr = static_cast<const T*>(t.data_ptr());
      fastkd::launch_kd<S, T>(l, s_ptr, t_ptr, ptr_or_null<S>(grad_s), ptr_or_null<T>(grad_t));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_grad(at::Tensor grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.is_cuda() && grad.dim() >= 1 && grad.stride(-1) == 1,
              "fastkd cuda backend: the gradient must be a CUDA tensor with contiguous rows");
  TORCH_CHECK(factor.device() == grad.device(), "fastkd cuda backend: the factor is on ", factor.device(),
              ", the gradient on ", grad.device());
  TORCH_CHECK(factor.scalar_type() == at::kFloat && factor.is_contiguous(), "fastkd cuda backend: factor must be contiguous fp32");
  const int64_t n_cols = grad.size(-1);
  const int64_t n_rows = n_cols == 0 ? 0 : grad.numel() / n_cols;
  if (n_rows == 0) return;
  TORCH_CHECK(grad.dim() == 2 || grad.is_contiguous(), "fastkd cuda backend: the gradient must be (N, C) or contiguous");
  const int64_t stride = grad.dim() == 2 ? grad.stride(0) : n_cols;
  const bool per_row = factor.dim() > 0 && factor.numel() != 1;
  TORCH_CHECK(!per_row || factor.numel() == n_rows, "fastkd cuda backend: one factor, or one per row");
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  const int device = grad.device().index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const int64_t strides[] = {stride};
  const int vec =
      fastkd::vector_width(n_cols, static_cast<int>(grad.element_size()), strides, 1, misalignment(grad));
  const int64_t vecs = n_cols / vec;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((vecs + dev::kBlock - 1) / dev::kBlock, 1024)),
                  static_cast<unsigned>(std::min<int64_t>(n_rows, 65535)));
  with_element_type(grad.scalar_type(), "the gradient", [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    E* g = static_cast<E*>(grad.data_ptr());
    const float* fct = factor.data_ptr<float>();
    auto launch = [&](auto kernel) { kernel<<<grid, dev::kBlock, 0, stream>>>(g, fct, n_rows, n_cols, stride, per_row); };
    switch (vec) {
      case 8:  // 16-bit only (16 bytes)
        if constexpr (sizeof(E) == 2) return launch(dev::scale_grad_kernel<E, 8>);
        [[fallthrough]];
      case 4:
        return launch(dev::scale_grad_kernel<E, 4>);
      case 2:
        return launch(dev::scale_grad_kernel<E, 2>);
      default:
        return launch(dev::scale_grad_kernel<E, 1>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
