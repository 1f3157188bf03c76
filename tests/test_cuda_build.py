"""The CUDA C++ backend finds its toolkit and says why it cannot run when it cannot. That it compiles
wherever a toolkit is (CI has CUDA 13.0 but no GPU) is checked on the installed wheel's copy of
the sources, in tests/test_packaging.py (one compile for the suite)."""
import shutil

import pytest
import torch

import fastkd
from fastkd import _cuda_build


def test_toolkit_root_comes_from_nvcc_not_its_folder(monkeypatch):
    """nvcc as a wrapper script in /usr/local/bin must not make /usr/local the toolkit."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    root = _cuda_build.toolkit_root()
    if root is None:
        pytest.skip("no nvcc")
    libs = list(_cuda_build.Path(root).glob("lib*/libcudart*")) + \
        list(_cuda_build.Path(root).glob("targets/*/lib/libcudart*"))
    assert libs, f"{root} holds no libcudart"


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(ValueError, match="backend='cuda' cannot run: .*CUDA tensors"):
        fastkd.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), backend="cuda")
    info = {b.name: b for b in fastkd.available_backends("cpu")}
    assert not info["cuda"].available and "CUDA tensors" in info["cuda"].reason


LAUNCH_LIMITS_CHECK = r"""
#include <cstdio>
#include <cstdlib>
#include "launch_limits.h"

#define EXPECT(cond) do { if (!(cond)) { std::printf("failed: %s\n", #cond); return 1; } } while (0)

int main() {
  using namespace fastkd;
  const std::size_t h100_optin = 232448, static_bytes = 1024;
  // 15 bins, both meters, fp32 partials: far below the default 48 KB
  EXPECT(plan_dynamic_smem(meter_smem_bytes(15, 2, 4), static_bytes, h100_optin) == SmemPlan::kDefault);
  // about 1023 bins with both meters pass 48 KB in fp64 (and 2047 in fp32): opt in, then launch
  EXPECT(meter_smem_bytes(1023, 2, 8) > kDefaultDynamicSmem);
  EXPECT(plan_dynamic_smem(meter_smem_bytes(1023, 2, 8), static_bytes, h100_optin) == SmemPlan::kOptIn);
  EXPECT(plan_dynamic_smem(meter_smem_bytes(2047, 2, 4), static_bytes, h100_optin) == SmemPlan::kOptIn);
  // beyond what the device gives a block: refused, and the message names num_bins
  const std::size_t needed = meter_smem_bytes(20000, 2, 4);
  EXPECT(plan_dynamic_smem(needed, static_bytes, h100_optin) == SmemPlan::kTooLarge);
  EXPECT(too_many_bins_message(20000, needed, h100_optin).find("num_bins=20000") != std::string::npos);
  // the static shared memory counts against the limit too
  EXPECT(plan_dynamic_smem(h100_optin - 100, 200, h100_optin) == SmemPlan::kTooLarge);
  std::printf("ok\n");
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_many_bins_opt_in_or_refused_up_front(tmp_path):
    """Histograms above 48 KB of shared memory opt in to the device's limit, or are refused with an
    error naming num_bins: the host arithmetic compiled and run here, no GPU needed."""
    import subprocess

    kernels = _cuda_build.KERNELS
    (tmp_path / "check.cpp").write_text(LAUNCH_LIMITS_CHECK)
    exe = tmp_path / "check"
    subprocess.run(["c++", "-std=c++17", "-I", str(kernels), str(tmp_path / "check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
    # and the launcher takes that path before every launch of the fused kernel
    source = (kernels / "kd_kernels.cu").read_text()
    assert "cudaFuncSetAttribute(" in source and "cudaFuncAttributeMaxDynamicSharedMemorySize" in source
    assert "plan_dynamic_smem(" in source and "cudaDevAttrMaxSharedMemoryPerBlockOptin" in source
