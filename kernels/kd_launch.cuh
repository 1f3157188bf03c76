// The definition of launch_kd (kd_launch.h), instantiated by kd_pair_*.cu: layout, shared memory,
// clusters and the persistent grid of the fused kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kd_device.cuh"
#include "kd_launch.h"
#include "launch_limits.h"

namespace fastkd {
namespace launch_detail {

namespace dev = device;
static_assert(dev::kBlock == kBlockThreads, "host and device agree on the CTA size");

// The answer of an occupancy query per (kernel, device, dynamic shared memory, cluster): each costs
// microseconds and would otherwise be asked on every call. A query that throws is not remembered.
template <typename Query>
int remembered(const void* kernel, int device, std::size_t smem, int cluster, Query query) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, std::size_t, int>, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, smem, cluster);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  const int answer = query();
  known.emplace(key, answer);
  return answer;
}

// The attributes of the code the driver loaded for `kernel` on `device` (the current one under the
// caller's guard): its PTX and SASS versions, its static shared memory. Asked once per (kernel,
// device); a query that throws is not remembered.
template <typename Kernel>
cudaFuncAttributes kernel_attributes(Kernel kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, cudaFuncAttributes> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  known.emplace(key, attributes);
  return attributes;
}

// Whether `kernel` may run as a cluster of `cluster` CTAs on `device`: decided by the code loaded for
// it (a build without sm_90 code runs on Hopper from older PTX, without the cluster code).
template <typename Kernel>
bool runs_clusters_of(Kernel kernel, int device, int cluster) {
  static_assert(FASTKD_CLUSTER_ARCH == 10 * kClusterPtxVersion, "host and device agree on the cluster arch");
  const cudaFuncAttributes a = kernel_attributes(kernel, device);
  return cluster <= max_cluster_for(a.ptxVersion, a.binaryVersion,
                                    device_attribute(cudaDevAttrClusterLaunch, device) != 0);
}

// One record per process of the dynamic shared memory each kernel was opted in to (launch_limits.h).
inline DynamicSmemOptIns& dynamic_smem_opt_ins() {
  static DynamicSmemOptIns opt_ins;
  return opt_ins;
}

// Lets `kernel` use `dynamic` bytes of dynamic shared memory on `device` (the current device under
// the caller's guard), or refuses with an error naming num_bins when the device cannot give them.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int device, std::size_t dynamic, int64_t num_bins) {
  const cudaFuncAttributes attributes = kernel_attributes(kernel, device);
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  switch (plan_dynamic_smem(dynamic, attributes.sharedSizeBytes, optin)) {
    case SmemPlan::kTooLarge:
      TORCH_CHECK(false, too_many_bins_message(num_bins, dynamic + attributes.sharedSizeBytes, optin));
    case SmemPlan::kOptIn:
      dynamic_smem_opt_ins().allow(reinterpret_cast<const void*>(kernel), device, dynamic, [&](std::size_t bytes) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)));
      });
      break;
    case SmemPlan::kDefault:
      break;
  }
}

// CTAs of `kernel` resident per SM on the current device (at least 1).
template <typename Kernel>
int ctas_per_sm(Kernel kernel, int device, std::size_t smem) {
  return remembered(reinterpret_cast<const void*>(kernel), device, smem, 1, [&] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, dev::kBlock, smem));
    return std::max(n, 1);
  });
}

inline cudaLaunchAttribute cluster_attribute(int cluster) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  return attribute;
}

// Clusters of `cluster` CTAs of `kernel` that can be resident at once on the current device (0: the
// cluster cannot run there). Sizes above 8 are Hopper's non-portable ones, opted into first.
template <typename Kernel>
int query_resident_clusters(Kernel kernel, int cluster, std::size_t smem, cudaStream_t stream) {
  if (cluster > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    (void)cudaGetLastError();  // not supported here: the caller falls back
    return 0;
  }
  cudaLaunchAttribute attribute = cluster_attribute(cluster);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster);
  config.blockDim = dim3(dev::kBlock);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return clusters;
}

template <typename Kernel>
int resident_clusters(Kernel kernel, int device, int cluster, std::size_t smem, cudaStream_t stream) {
  return remembered(reinterpret_cast<const void*>(kernel), device, smem, cluster,
                    [&] { return query_resident_clusters(kernel, cluster, smem, stream); });
}

// A persistent grid: as many CTAs (or clusters) as are resident at once, at most one per tile.
template <typename Kernel, typename S, typename T>
void launch_grid(Kernel kernel, const KdLaunch& l, const Layout& layout, const dev::Params& p, const S* s,
                 const T* t, S* gs, T* gt, int clusters) {
  const int64_t tiles = (p.n_rows + layout.rows_per_tile - 1) / layout.rows_per_tile;
  cudaLaunchAttribute attribute = cluster_attribute(layout.cluster);
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(dev::kBlock);
  config.dynamicSmemBytes = l.smem;
  config.stream = l.stream;
  if (layout.cluster > 1) {
    config.attrs = &attribute;
    config.numAttrs = 1;
    config.gridDim = dim3(static_cast<unsigned>(std::min<int64_t>(tiles, clusters) * layout.cluster));
  } else {
    const int64_t resident =
        static_cast<int64_t>(device_attribute(cudaDevAttrMultiProcessorCount, l.device)) *
        ctas_per_sm(kernel, l.device, l.smem);
    config.gridDim = dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(tiles, resident))));
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, s, t, gs, gt, p));
}

// One build (light or heavy) of the kernels: the layout's kernel, launched. A row too long for a CTA
// takes a cluster when the kernel's loaded code has the cluster path; when it has not, or the device
// cannot run a cluster that large (the non-portable 16, or any), the next smaller maximum is tried,
// down to the looping kernel.
template <typename S, typename T, bool LIGHT>
void launch_build(const KdLaunch& l, const S* s, const T* t, S* gs, T* gt) {
  for (int max_cluster : {kMaxCluster, 8, 1}) {
    const Layout layout = choose_layout(l.p.n_cols, l.vec, max_cluster);
    dev::Params p = l.p;
    p.group = layout.group;
    p.vec = layout.vec;
    p.cluster = layout.cluster;
    p.part_cols = layout.part_cols;
    p.flush_tiles = layout.flush_tiles;
    if (layout.loop) {
      auto kernel = dev::kd_loop_kernel<S, T, LIGHT>;
      allow_dynamic_smem(kernel, l.device, l.smem, l.num_bins);
      return launch_grid(kernel, l, layout, p, s, t, gs, gt, 1);
    }
    auto kernel = layout.k == 16 ? dev::kd_rows_kernel<S, T, 16, LIGHT> : dev::kd_rows_kernel<S, T, 32, LIGHT>;
    if (layout.cluster > 1 && !runs_clusters_of(kernel, l.device, layout.cluster)) continue;
    allow_dynamic_smem(kernel, l.device, l.smem, l.num_bins);
    if (layout.cluster == 1) return launch_grid(kernel, l, layout, p, s, t, gs, gt, 1);
    const int clusters = resident_clusters(kernel, l.device, layout.cluster, l.smem, l.stream);
    if (clusters > 0) return launch_grid(kernel, l, layout, p, s, t, gs, gt, clusters);
  }
  TORCH_CHECK(false, "fastkd cuda backend: no layout could launch");  // unreachable: max_cluster 1 always does
}

}  // namespace launch_detail

// Student and teacher of one dtype get both builds; mixed dtypes (rarer) only the heavy one, which
// runs every variant: a third fewer kernels to compile.
template <typename S, typename T>
void launch_kd(const KdLaunch& l, const S* s, const T* t, S* gs, T* gt) {
  if constexpr (std::is_same_v<S, T>) {
    if (device::is_light(l.p.flags)) return launch_detail::launch_build<S, T, true>(l, s, t, gs, gt);
  }
  launch_detail::launch_build<S, T, false>(l, s, t, gs, gt);
}

}  // namespace fastkd
