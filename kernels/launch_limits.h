// Host-only launch arithmetic of the CUDA backend: no CUDA or torch headers, so that
// tests/test_cuda_build.py can compile and run it on a machine without a GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace fastkd {

// The default dynamic shared memory a kernel may use without opting in.
constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;

// One calibration meter's shared-memory partial histogram: per bin (num_bins + 1 of them, the
// last for confidence 1.0 and NaN) a count, a confidence sum and a correct count, plus the NLL and
// Brier totals; each value takes value_bytes.
inline std::size_t meter_smem_bytes(int64_t num_bins, int n_meters, std::size_t value_bytes) {
  return static_cast<std::size_t>(n_meters) * value_bytes * (3 * static_cast<std::size_t>(num_bins + 1) + 2);
}

enum class SmemPlan {
  kDefault,   // fits the default limit: launch as is
  kOptIn,     // needs cudaFuncAttributeMaxDynamicSharedMemorySize set to the dynamic size first
  kTooLarge,  // above what the device allows a block: refuse before launching
};

// What a launch with `dynamic` bytes of dynamic shared memory (plus the kernel's `static_bytes`)
// needs on a device whose opt-in per-block limit is `optin_limit`.
inline SmemPlan plan_dynamic_smem(std::size_t dynamic, std::size_t static_bytes, std::size_t optin_limit) {
  if (dynamic + static_bytes > optin_limit) return SmemPlan::kTooLarge;
  return dynamic <= kDefaultDynamicSmem ? SmemPlan::kDefault : SmemPlan::kOptIn;
}

// The largest dynamic shared memory each (kernel, device) has been opted in to. The attribute
// (cudaFuncAttributeMaxDynamicSharedMemorySize) is one value per function on a device, whatever
// the size of the launch that set it: setting it to 50 KB for one launch makes the next launch of
// the same kernel with 60 KB fail. So it is only ever raised, and set only when a launch needs more
// than it allows. The set runs under the lock, so that two threads cannot lower it between them.
class DynamicSmemOptIns {
 public:
  // Makes `dynamic` bytes launchable for `kernel` on `device`: calls set(dynamic) first when the
  // attribute is below it (a set that throws leaves the record as it was).
  template <typename Set>
  void allow(const void* kernel, int device, std::size_t dynamic, Set set) {
    const std::lock_guard<std::mutex> lock(mutex_);
    std::size_t& opted_in = largest_[{kernel, device}];
    if (dynamic <= std::max(opted_in, kDefaultDynamicSmem)) return;
    set(dynamic);
    opted_in = dynamic;
  }

 private:
  std::mutex mutex_;
  std::map<std::pair<const void*, int>, std::size_t> largest_;
};

// The error a caller sees when the meters' histograms cannot fit on the device.
inline std::string too_many_bins_message(int64_t num_bins, std::size_t needed, std::size_t limit) {
  return "fastkd cuda backend: num_bins=" + std::to_string(num_bins) + " needs " + std::to_string(needed) +
         " bytes of shared memory per block for the calibration histograms, more than this device's " +
         std::to_string(limit) + "; use fewer bins (or backend='triton'/'torch')";
}

// ---------------------------------------------------------------------------------------------
// Which kernel and thread layout a row length takes (see kernels/kd_device.cuh). Rows are held in
// registers, K = 16 or 32 elements per thread (more spills with 16-bit logits), by `group` threads (lanes of a warp up to 32, whole warps up
// to a CTA of kBlockThreads), by the `cluster` CTAs of a thread-block cluster beyond that (Hopper),
// and loop over chunks only when none of these holds them.
constexpr int kBlockThreads = 256;
constexpr int kMaxCluster = 16;  // Hopper's non-portable cluster size (opted into at launch; 8 is portable)
constexpr int kRowsPerFlush = 1024;  // rows between two flushes of a CTA's fp32 meter partials
// The cluster code is compiled only for __CUDA_ARCH__ >= 900 (FASTKD_CLUSTER_ARCH in kd_device.cuh);
// cudaFuncAttributes::ptxVersion is that arch / 10 for the code the driver loaded.
constexpr int kClusterPtxVersion = 90;

// The largest cluster a kernel may be launched with, from the attributes of the code the driver
// loaded for it (cudaFuncGetAttributes on the device) and whether the device launches clusters
// (cudaDevAttrClusterLaunch). Not from the device's compute capability: a build without sm_90 code
// (TORCH_CUDA_ARCH_LIST="8.0;8.6+PTX") runs on an H100 from compute_86 PTX, whose cluster code was
// compiled out (the barrier traps). A ptx_version the driver cannot tell (0) means no clusters.
inline int max_cluster_for(int ptx_version, int binary_version, bool device_launches_clusters) {
  const bool cluster_code = ptx_version >= kClusterPtxVersion && binary_version >= kClusterPtxVersion;
  return cluster_code && device_launches_clusters ? kMaxCluster : 1;
}

struct Layout {
  bool loop;         // the looping kernel (two or three sweeps), else rows in registers
  int k;             // elements per thread: 16 or 32
  int group;         // threads per CTA part of a row: a power of 2, at most kBlockThreads
  int vec;           // elements per vector access
  int cluster;       // CTAs per row
  int part_cols;     // columns per CTA part
  int rows_per_tile; // rows a CTA handles at once
  int flush_tiles;   // tiles between two meter flushes
};

inline int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Elements per vector access: the widest of 8, 4, 2, 1 that keeps a vector within 16 bytes of the
// widest dtype and divides the row length, every row stride and every base address (in elements
// of that tensor: `misalignment` is the OR of each base address divided by its element size).
inline int vector_width(int64_t n_cols, int widest_bytes, const int64_t* strides, int n_strides,
                        uint64_t misalignment) {
  for (int vec = 16 / widest_bytes; vec > 1; vec /= 2) {
    bool fits = n_cols % vec == 0 && misalignment % vec == 0;
    for (int i = 0; i < n_strides; ++i) fits = fits && strides[i] % vec == 0;
    if (fits) return vec;
  }
  return 1;
}

// The layout for rows of n_cols logits; max_cluster: the largest cluster the device runs (1: none).
inline Layout choose_layout(int64_t n_cols, int vec, int max_cluster) {
  Layout l{};
  l.vec = vec;
  l.cluster = 1;
  l.part_cols = static_cast<int>(n_cols);
  const int64_t cta_cols = 32 * kBlockThreads;  // a CTA's columns at K = 32
  if (n_cols <= 16 * 32) {  // K = 16: a few lanes per row, several rows per warp
    l.k = 16;
    l.group = pow2_at_least((n_cols + 15) / 16);
  } else if (n_cols <= cta_cols) {  // K = 32: a warp, or several, per row
    l.k = 32;
    l.group = pow2_at_least((n_cols + 31) / 32);
  } else if (n_cols <= cta_cols * max_cluster) {  // a CTA per part of the row, a cluster per row
    l.k = 32;
    l.group = kBlockThreads;
    l.part_cols = static_cast<int>(cta_cols);
    l.cluster = static_cast<int>((n_cols + cta_cols - 1) / cta_cols);
  } else {  // two sweeps over chunks of kBlockThreads * 16 columns
    l.loop = true;
    l.k = 16;
    l.group = kBlockThreads;
  }
  l.rows_per_tile = kBlockThreads / l.group;
  l.flush_tiles = std::max(1, kRowsPerFlush / l.rows_per_tile);
  return l;
}

}  // namespace fastkd
