// Host-only launch arithmetic of the CUDA backend: no CUDA or torch headers, so that
// tests/test_cuda_build.py can compile and run it on a machine without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

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

// The error a caller sees when the meters' histograms cannot fit on the device.
inline std::string too_many_bins_message(int64_t num_bins, std::size_t needed, std::size_t limit) {
  return "fastkd cuda backend: num_bins=" + std::to_string(num_bins) + " needs " + std::to_string(needed) +
         " bytes of shared memory per block for the calibration histograms, more than this device's " +
         std::to_string(limit) + "; use fewer bins (or backend='triton'/'torch')";
}

}  // namespace fastkd
