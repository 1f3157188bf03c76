// fastkd's fused KD loss in CUDA C++: the same math as fastkd/_triton_kd.py.
//
// Per row, a = s/T, b = t/T. Sweep 1: online max and sum-exp of a and b (and of s at T = 1 for
// the cross-entropy and the calibration statistics). Sweep 2: the divergence, and for
// KL(p_t || p_s) already the student's gradient. Sweep 3 (reverse KL, JSD, teacher gradients):
// the gradients that need the divergence's value. Rows up to 1024 classes get one warp, longer
// rows a block of 8 warps; sweeps 2-3 re-read the row, which is then in L1/L2 for rows that fit.
// Calibration histograms are accumulated per block in shared memory and flushed with one
// atomicAdd per bin per block (blocks stride over rows).
// Light headers only: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "launch_limits.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Params {
  int64_t n_rows, n_cols, stride_s, stride_t, stride_gs, stride_gt, ignore_index;
  float inv_temp, kd_scale, ce_scale, beta;
  int divergence;  // 0 KL(p_t||p_s), 1 KL(p_s||p_t), 2 generalised JSD
  bool has_ce, grad_s, grad_t;
  int num_bins;
  const int64_t* labels;   // null: no labels
  const int64_t* row_count;  // rows that count, summed on the device; null: use inv_count
  float inv_count;
  float grad_unit;  // 0: gradients times the row scale; > 0: times grad_unit, no row scale (fp16)
  const float* edges;      // num_bins + 2 (last = +inf)
  float* loss;
  double* meter_s;  // null: no student meter
  double* meter_t;  // null: no teacher meter
};

// Running softmax statistics of one row: max, sum exp((x-m)/T), sum exp(x-m), sum exp(2(x-m)), argmax.
struct Stats {
  float m, zt, z1, z2;
  int64_t arg;
};

__device__ __forceinline__ Stats empty_stats() { return {-INFINITY, 0.f, 0.f, 0.f, 0}; }

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b, float inv_temp) {
  float m = fmaxf(a.m, b.m);
  if (isnan(a.zt) || isnan(b.zt)) return {m, NAN, NAN, NAN, a.arg};
  if (m == -INFINITY) return a;  // both empty (or all -inf so far)
  float ra = expf(a.m - m), rb = expf(b.m - m);
  Stats r;
  r.m = m;
  r.zt = a.zt * expf((a.m - m) * inv_temp) + b.zt * expf((b.m - m) * inv_temp);
  r.z1 = a.z1 * ra + b.z1 * rb;
  r.z2 = a.z2 * ra * ra + b.z2 * rb * rb;
  r.arg = b.m > a.m ? b.arg : (a.m > b.m ? a.arg : min(a.arg, b.arg));  // first maximum wins
  return r;
}

__device__ __forceinline__ Stats push(const Stats& st, float x, int64_t col, float inv_temp) {
  if (x == -INFINITY) return st;  // a masked class has no mass
  if (isnan(x)) return {st.m, NAN, NAN, NAN, st.arg};  // NaN in, NaN out
  Stats one = {x, 1.f, 1.f, 1.f, col};
  return merge(st, one, inv_temp);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

__device__ __forceinline__ Stats warp_merge(Stats s, float inv_temp) {
  for (int o = 16; o > 0; o >>= 1) {
    Stats other = {__shfl_xor_sync(0xffffffff, s.m, o), __shfl_xor_sync(0xffffffff, s.zt, o),
                   __shfl_xor_sync(0xffffffff, s.z1, o), __shfl_xor_sync(0xffffffff, s.z2, o),
                   __shfl_xor_sync(0xffffffff, s.arg, o)};
    s = merge(s, other, inv_temp);
  }
  return s;
}

// Reductions over the threads of one row: a warp, or (BLOCK_ROW) the whole block.
template <bool BLOCK_ROW>
__device__ float group_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (!BLOCK_ROW) return v;
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float r = 0.f;
  for (int i = 0; i < kWarps; ++i) r += scratch[i];
  return r;
}

template <bool BLOCK_ROW>
__device__ Stats group_merge(Stats s, float inv_temp, Stats* scratch) {
  s = warp_merge(s, inv_temp);
  if (!BLOCK_ROW) return s;
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = s;
  __syncthreads();
  Stats r = scratch[0];
  for (int i = 1; i < kWarps; ++i) r = merge(r, scratch[i], inv_temp);
  return r;
}

struct Terms {
  float ps, pt, ref_s, ref_t, term_s, term_t;
};

__device__ __forceinline__ Terms divergence_terms(float x, float y, float lse_a, float lse_b,
                                                  const Params& p) {
  Terms e;
  float la = x * p.inv_temp - lse_a, lb = y * p.inv_temp - lse_b;
  e.ps = expf(la);
  e.pt = expf(lb);
  e.ref_t = lb - la;
  e.ref_s = la - lb;
  if (p.divergence == 2) {
    float lm = logf(p.beta * e.pt + (1.f - p.beta) * e.ps);
    e.ref_t = lb - lm;
    e.ref_s = la - lm;
  }
  e.term_s = e.ps > 0.f ? e.ps * e.ref_s : 0.f;  // 0 log 0 = 0
  e.term_t = e.pt > 0.f ? e.pt * e.ref_t : 0.f;
  return e;
}

// The factor a row's gradient is written with: 0 for ignored rows, NaN for a row whose label is
// out of range (a loss scaler then skips the step), else grad_unit or the row scale w.
__device__ __forceinline__ float grad_scale(bool keep, bool bad_label, float w, const Params& p) {
  if (!keep) return 0.f;
  if (bad_label) return NAN;
  return p.grad_unit > 0.f ? p.grad_unit : w;
}

template <typename scalar_t>
__device__ __forceinline__ void store_grads(const Terms& e, float x, int64_t col, int64_t label,
                                            float lse_1, float scale, float d_s, float d_t,
                                            scalar_t* gs, scalar_t* gt, const Params& p) {
  float ga, gb;
  if (p.divergence == 0) {
    ga = e.ps - e.pt;
    gb = e.pt > 0.f ? e.pt * (e.ref_t - d_t) : 0.f;
  } else if (p.divergence == 1) {
    ga = e.ps > 0.f ? e.ps * (e.ref_s - d_s) : 0.f;
    gb = e.pt - e.ps;
  } else {
    ga = (1.f - p.beta) * (e.ps > 0.f ? e.ps * (e.ref_s - d_s) : 0.f);
    gb = p.beta * (e.pt > 0.f ? e.pt * (e.ref_t - d_t) : 0.f);
  }
  float kd_g = p.kd_scale * p.inv_temp;
  if (p.grad_s) {
    float g = kd_g * ga;
    if (p.has_ce) g += p.ce_scale * (expf(x - lse_1) - (col == label ? 1.f : 0.f));
    gs[col] = static_cast<scalar_t>(scale != 0.f ? g * scale : 0.f);
  }
  if (p.grad_t) gt[col] = static_cast<scalar_t>(scale != 0.f ? kd_g * gb * scale : 0.f);
}

// The histogram bin of a confidence: bucketize(right=True) - 1 on the meter's fp32 edges; NaN
// (an all -inf or NaN row) goes to the last bin, as in CalibrationMeter.update.
__device__ __forceinline__ int confidence_bin(float conf, const Params& p) {
  if (isnan(conf)) return p.num_bins;
  int b = min(max(static_cast<int>(conf * p.num_bins), 0), p.num_bins);
  if (conf < p.edges[b]) b -= 1;
  if (conf >= p.edges[b + 1]) b += 1;
  return min(max(b, 0), p.num_bins);
}

// Adds one row to a shared-memory histogram laid out as the meter's state. `label` is -1 for an
// out-of-range label (never correct; x_label is then NaN, so are NLL and Brier).
__device__ void meter_add(double* hist, const Stats& st, float x_label, int64_t label, const Params& p) {
  float lse_1 = st.m + logf(st.z1);
  float conf = isfinite(st.z1) && st.z1 > 0.f ? 1.f / st.z1 : NAN;  // the top class has mass 1
  int nb = p.num_bins + 1;
  int b = confidence_bin(conf, p);
  atomicAdd(hist + b, 1.0);
  atomicAdd(hist + nb + b, static_cast<double>(conf));
  atomicAdd(hist + 2 * nb + b, st.arg == label ? 1.0 : 0.0);
  atomicAdd(hist + 3 * nb, static_cast<double>(lse_1 - x_label));
  atomicAdd(hist + 3 * nb + 1,
            static_cast<double>(st.z2 / (st.z1 * st.z1) - 2.f * expf(x_label - lse_1) + 1.f));
}

template <typename scalar_t, bool BLOCK_ROW>
__global__ void __launch_bounds__(kThreads)
    kd_fwd_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                  scalar_t* __restrict__ gs, scalar_t* __restrict__ gt, Params p) {
  extern __shared__ double hist[];  // student histogram, then teacher histogram
  __shared__ Stats stats_scratch[kWarps];
  __shared__ float sum_scratch[kWarps];
  const int hist_size = 3 * (p.num_bins + 1) + 2;
  const int n_hist = (p.meter_s ? 1 : 0) + (p.meter_t ? 1 : 0);
  for (int i = threadIdx.x; i < n_hist * hist_size; i += blockDim.x) hist[i] = 0.0;
  __syncthreads();
  double* hist_s = hist;
  double* hist_t = hist + (p.meter_s ? hist_size : 0);

  const int group = BLOCK_ROW ? kThreads : 32;
  const int lane = threadIdx.x % group;
  const int rows_per_block = kThreads / group;
  const bool need_1 = p.has_ce || p.meter_s;
  const bool late_grad = (p.grad_s && p.divergence != 0) || (p.grad_t && p.divergence != 1);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / group;
       row < p.n_rows; row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const scalar_t* srow = s + row * p.stride_s;
    const scalar_t* trow = t + row * p.stride_t;
    int64_t label = p.labels ? p.labels[row] : 0;
    bool keep = !p.labels || label != p.ignore_index;
    bool bad_label = keep && p.labels && (label < 0 || label >= p.n_cols);  // validate_labels=False
    label = keep && !bad_label ? label : 0;  // an index that is safe to read
    float w = keep ? (p.row_count ? 1.f / fmaxf(static_cast<float>(*p.row_count), 1.f) : p.inv_count) : 0.f;
    float gscale = grad_scale(keep, bad_label, w, p);

    Stats st_s = empty_stats(), st_t = empty_stats();
    for (int64_t c = lane; c < p.n_cols; c += group) {  // sweep 1
      st_s = push(st_s, static_cast<float>(srow[c]), c, p.inv_temp);
      st_t = push(st_t, static_cast<float>(trow[c]), c, p.inv_temp);
    }
    st_s = group_merge<BLOCK_ROW>(st_s, p.inv_temp, stats_scratch);
    st_t = group_merge<BLOCK_ROW>(st_t, p.inv_temp, stats_scratch);
    float lse_a = st_s.m * p.inv_temp + logf(st_s.zt);
    float lse_b = st_t.m * p.inv_temp + logf(st_t.zt);
    float lse_1 = need_1 ? st_s.m + logf(st_s.z1) : 0.f;

    float d_s = 0.f, d_t = 0.f;
    for (int64_t c = lane; c < p.n_cols; c += group) {  // sweep 2
      float x = static_cast<float>(srow[c]);
      Terms e = divergence_terms(x, static_cast<float>(trow[c]), lse_a, lse_b, p);
      d_s += e.term_s;
      d_t += e.term_t;
      if (!late_grad)
        store_grads(e, x, c, label, lse_1, gscale, 0.f, 0.f, gs + row * p.stride_gs, gt + row * p.stride_gt, p);
    }
    d_s = group_sum<BLOCK_ROW>(d_s, sum_scratch);
    d_t = group_sum<BLOCK_ROW>(d_t, sum_scratch);
    if (late_grad) {
      for (int64_t c = lane; c < p.n_cols; c += group) {  // sweep 3
        float x = static_cast<float>(srow[c]);
        Terms e = divergence_terms(x, static_cast<float>(trow[c]), lse_a, lse_b, p);
        store_grads(e, x, c, label, lse_1, gscale, d_s, d_t, gs + row * p.stride_gs, gt + row * p.stride_gt, p);
      }
    }
    if (lane == 0) {
      float div = p.divergence == 0 ? d_t : (p.divergence == 1 ? d_s : p.beta * d_t + (1.f - p.beta) * d_s);
      float x_label = bad_label ? NAN : (keep && p.labels ? static_cast<float>(srow[label]) : 0.f);
      float loss = p.kd_scale * div;
      if (p.has_ce) loss += p.ce_scale * (lse_1 - x_label);
      p.loss[row] = keep ? (bad_label ? NAN : loss * w) : 0.f;
      int64_t meter_label = bad_label ? -1 : label;
      if (keep && p.meter_s) meter_add(hist_s, st_s, x_label, meter_label, p);
      if (keep && p.meter_t) {
        // the teacher's T = 1 statistics were gathered with the same push (z1, z2 at T = 1)
        float y_label = bad_label ? NAN : static_cast<float>(trow[label]);
        meter_add(hist_t, st_t, y_label, meter_label, p);
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < hist_size; i += blockDim.x) {
    if (p.meter_s && hist_s[i] != 0.0) atomicAdd(p.meter_s + i, hist_s[i]);
    if (p.meter_t && hist_t[i] != 0.0) atomicAdd(p.meter_t + i, hist_t[i]);
  }
}

template <typename scalar_t>
__global__ void scale_grad_kernel(scalar_t* __restrict__ grad, const float* __restrict__ factor,
                                  int64_t n_cols, int64_t n, bool per_row) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float f = factor[per_row ? i / n_cols : 0];
    if (f != 1.f) grad[i] = static_cast<scalar_t>(static_cast<float>(grad[i]) * f);  // 1: no traffic
  }
}

template <typename T>
T* ptr_or_null(const c10::optional<at::Tensor>& x) {
  return x.has_value() && x->defined() ? x->data_ptr<T>() : nullptr;
}

// Blocks for a grid-stride launch on `device` (the tensors' device, not the current one).
int grid_for(int device, int64_t work_items, int per_block) {
  int sms = 1;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int64_t blocks = (work_items + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 16LL * sms)));
}

void check_on_device(const c10::optional<at::Tensor>& x, const at::Device& device, const char* name) {
  if (x.has_value() && x->defined())
    TORCH_CHECK(x->device() == device, "fastkd cuda backend: ", name, " is on ", x->device(),
                ", the logits on ", device);
}

// Lets `kernel` use `dynamic` bytes of dynamic shared memory on `device` (the current device under
// the caller's guard), or refuses with an error naming num_bins when the device cannot give them.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int device, std::size_t dynamic, int64_t num_bins) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  switch (fastkd::plan_dynamic_smem(dynamic, attributes.sharedSizeBytes, optin)) {
    case fastkd::SmemPlan::kTooLarge:
      TORCH_CHECK(false, fastkd::too_many_bins_message(num_bins, dynamic + attributes.sharedSizeBytes, optin));
    case fastkd::SmemPlan::kOptIn:
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(dynamic)));
      break;
    case fastkd::SmemPlan::kDefault:
      break;
  }
}

template <typename scalar_t, bool BLOCK_ROW>
void launch_kd_forward(const at::Tensor& s, const at::Tensor& t, scalar_t* gs, scalar_t* gt, const Params& p,
                       int device, std::size_t smem, int64_t num_bins, cudaStream_t stream) {
  auto kernel = kd_fwd_kernel<scalar_t, BLOCK_ROW>;
  allow_dynamic_smem(kernel, device, smem, num_bins);
  const int grid = grid_for(device, p.n_rows, BLOCK_ROW ? 1 : kWarps);
  kernel<<<grid, kThreads, smem, stream>>>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), gs, gt, p);
}

}  // namespace

void kd_forward(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& labels,
                const c10::optional<at::Tensor>& row_count, double inv_count, const at::Tensor& edges, at::Tensor loss,
                const c10::optional<at::Tensor>& grad_s, const c10::optional<at::Tensor>& grad_t,
                const c10::optional<at::Tensor>& meter_s, const c10::optional<at::Tensor>& meter_t,
                double inv_temp, double kd_scale, double ce_scale, double beta, int64_t divergence,
                int64_t ignore_index, bool has_ce, int64_t num_bins, double grad_unit) {
  TORCH_CHECK(s.is_cuda() && t.is_cuda(), "fastkd cuda backend: tensors must be on a CUDA device");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "fastkd cuda backend: student and teacher dtypes differ");
  TORCH_CHECK(s.stride(1) == 1 && t.stride(1) == 1, "fastkd cuda backend: rows must be contiguous");
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
  const c10::cuda::OptionalCUDAGuard guard(device);  // launches and queries below go to `device`
  Params p;
  p.n_rows = s.size(0);
  p.n_cols = s.size(1);
  p.stride_s = s.stride(0);
  p.stride_t = t.stride(0);
  p.stride_gs = grad_s.has_value() ? grad_s->stride(0) : 0;
  p.stride_gt = grad_t.has_value() ? grad_t->stride(0) : 0;
  p.ignore_index = ignore_index;
  p.inv_temp = static_cast<float>(inv_temp);
  p.kd_scale = static_cast<float>(kd_scale);
  p.ce_scale = static_cast<float>(ce_scale);
  p.beta = static_cast<float>(beta);
  p.divergence = static_cast<int>(divergence);
  p.has_ce = has_ce;
  p.grad_s = grad_s.has_value();
  p.grad_t = grad_t.has_value();
  p.num_bins = static_cast<int>(num_bins);
  p.labels = ptr_or_null<int64_t>(labels);
  p.row_count = ptr_or_null<int64_t>(row_count);
  p.inv_count = static_cast<float>(inv_count);
  p.grad_unit = static_cast<float>(grad_unit);
  p.edges = edges.data_ptr<float>();
  p.loss = loss.data_ptr<float>();
  p.meter_s = ptr_or_null<double>(meter_s);
  p.meter_t = ptr_or_null<double>(meter_t);
  if (p.n_rows == 0) return;
  const bool block_row = p.n_cols > 1024;
  const int n_hist = (p.meter_s ? 1 : 0) + (p.meter_t ? 1 : 0);
  const std::size_t smem = fastkd::meter_smem_bytes(num_bins, n_hist, sizeof(double));
  const int dev = device.index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fastkd_kd_forward", [&] {
    scalar_t* gs = p.grad_s ? grad_s->data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = p.grad_t ? grad_t->data_ptr<scalar_t>() : nullptr;
    if (block_row) {
      launch_kd_forward<scalar_t, true>(s, t, gs, gt, p, dev, smem, num_bins, stream);
    } else {
      launch_kd_forward<scalar_t, false>(s, t, gs, gt, p, dev, smem, num_bins, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_grad(at::Tensor grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.is_contiguous(), "fastkd cuda backend: the gradient must be contiguous");
  TORCH_CHECK(factor.device() == grad.device(), "fastkd cuda backend: the factor is on ", factor.device(),
              ", the gradient on ", grad.device());
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  const int dev = grad.device().index();
  const int grid = grid_for(dev, n, kThreads * 4);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastkd_scale_grad", [&] {
    scale_grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), factor.data_ptr<float>(), grad.size(-1), n, factor.dim() > 0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
