// The host's launch of the fused kernels, declared for kd_kernels.cu and defined in kd_launch.cuh,
// which the per-student-dtype units kd_pair_*.cu instantiate (so that they compile in parallel).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kd_device.cuh"

namespace fastkd {

struct KdLaunch {
  device::Params p;  // all but the layout fields, which launch_kd fills for the layout it takes
  int vec;           // elements per vector access, from every stride and address
  int device;        // the tensors' device, current under the caller's guard
  std::size_t smem;  // dynamic shared memory: the meters' histograms
  int64_t num_bins;
  cudaStream_t stream;
};

// Chooses the layout for the row length, falling back from clusters the kernel's loaded code or the
// device cannot run, and launches the light or the heavy build of its kernel (device::is_light;
// mixed dtypes: heavy).
template <typename S, typename T>
void launch_kd(const KdLaunch& l, const S* s, const T* t, S* gs, T* gt);

// Attributes of the tensors' device (the current one under the caller's guard).
int device_attribute(cudaDeviceAttr attribute, int device);

}  // namespace fastkd
