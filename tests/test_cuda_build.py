"""The CUDA C++ backend finds its toolkit and says why it cannot run when it cannot. That it compiles
wherever a toolkit is (CI has CUDA 13.0 but no GPU) is checked on the installed wheel's copy of
the sources, in tests/test_packaging.py (one full build, for sm_90); its device code for the other
architectures a user may name, below (compile only)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fastkd
from fastkd.backends.cuda import build as _cuda_build


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
    # and the launcher takes that path before every launch of the fused kernels
    source = (kernels / "kd_launch.cuh").read_text()
    assert "cudaFuncSetAttribute(" in source and "cudaFuncAttributeMaxDynamicSharedMemorySize" in source
    assert "plan_dynamic_smem(" in source and "cudaDevAttrMaxSharedMemoryPerBlockOptin" in source
    assert source.count("allow_dynamic_smem(kernel") == 2  # the looping kernel and the row kernels


LAYOUT_PRINTER = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include "launch_limits.h"

// prints "cols max_cluster loop k group vec cluster part_cols rows_per_tile flush_tiles" per line
int main(int argc, char** argv) {
  for (int i = 1; i + 2 < argc; i += 3) {
    const long long cols = std::atoll(argv[i]);
    const int vec = std::atoi(argv[i + 1]), max_cluster = std::atoi(argv[i + 2]);
    const fastkd::Layout l = fastkd::choose_layout(cols, vec, max_cluster);
    std::printf("%lld %d %d %d %d %d %d %d %d %d\n", cols, max_cluster, l.loop, l.k, l.group, l.vec, l.cluster,
                l.part_cols, l.rows_per_tile, l.flush_tiles);
  }
  const int64_t strides[] = {10, 10};
  std::printf("vec %d %d %d %d\n", fastkd::vector_width(10, 4, strides, 2, 0),  // C = 10 fp32: 8-byte vectors
              fastkd::vector_width(128256, 2, nullptr, 0, 0),                    // bf16: 16 bytes
              fastkd::vector_width(128256, 2, nullptr, 0, 3),                    // a misaligned base: scalar
              fastkd::vector_width(1000, 4, strides, 2, 0));                     // a stride of 10: pairs
  return 0;
}
"""


def _compile_host(tmp_path, source, name, *flags):
    import subprocess

    (tmp_path / f"{name}.cpp").write_text(source)
    exe = tmp_path / name
    subprocess.run(["c++", "-std=c++17", "-I", str(_cuda_build.KERNELS), str(tmp_path / f"{name}.cpp"), "-o", str(exe),
                    *flags], check=True, capture_output=True, text=True)
    return exe


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_layouts_hold_each_row_once_and_the_counting_tool_agrees(tmp_path):
    """Every row length gets a layout whose threads hold the whole row (K per thread), several rows
    per warp for short rows, a cluster of at most 16 CTAs for long ones on Hopper (the loop
    elsewhere); bench/tools/cuda_sass_count.py, which counts exactly these layouts, mirrors the C++ rules."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "tools"))
    import cuda_sass_count as sass_count

    cases = [(c, v, m) for c in (1, 2, 10, 16, 17, 100, 512, 513, 1000, 1024, 1025, 2000, 8192, 8193, 32000,
                                 65536, 128256, 131072, 131073, 262144) for v, m in ((1, 16), (4, 8), (8, 1))]
    exe = _compile_host(tmp_path, LAYOUT_PRINTER, "layouts")
    out = subprocess.run([str(exe)] + [str(x) for case in cases for x in case], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    for line, (cols, vec, max_cluster) in zip(out, cases):
        _, _, loop, k, group, lvec, cluster, part_cols, rows_per_tile, flush = map(int, line.split())
        assert lvec == vec and rows_per_tile * group == 256 and flush == max(1, 1024 // rows_per_tile)
        if loop:
            assert cols > 32 * 256 * max_cluster and k == 16 and group == 256
        else:
            assert k * group * cluster >= cols, line  # the row fits in registers
            assert cluster <= max_cluster and (cluster == 1 or (group == 256 and part_cols == k * 256))
            assert cluster == 1 or part_cols * (cluster - 1) < cols  # no CTA without columns
            if cols <= 16:
                assert group == 1, line  # a thread per row
        mirror = sass_count.choose_layout(cols, 4, max_cluster)  # same rules (vec aside)
        assert (mirror.loop, mirror.k, mirror.group, mirror.cluster) == (bool(loop), k, group, cluster), line
    assert out[-1] == "vec 2 8 1 2"



LAUNCH_DECISIONS_CHECK = r"""
#include <atomic>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>
#include "launch_limits.h"

#define EXPECT(cond) do { if (!(cond)) { std::printf("failed line %d: %s\n", __LINE__, #cond); return 1; } } while (0)

using namespace fastkd;

// A stand-in for the runtime: cudaFuncAttributeMaxDynamicSharedMemorySize, one value per
// (function, device), 48 KB until set; a launch with more dynamic shared memory fails.
struct FakeRuntime {
  std::atomic<std::size_t> attribute[2][2];
  int sets = 0;
  FakeRuntime() { for (auto& d : attribute) for (auto& k : d) k = kDefaultDynamicSmem; }
  // what allow_dynamic_smem does before a launch, then whether the launch would pass
  bool launch(DynamicSmemOptIns& opt_ins, int kernel, int device, std::size_t dynamic) {
    static const char names[2] = {'a', 'b'};
    opt_ins.allow(&names[kernel], device, dynamic, [&](std::size_t bytes) {
      attribute[kernel][device] = bytes;
      ++sets;
    });
    return dynamic <= attribute[kernel][device];
  }
};

int main() {
  // item 3: the cluster path from the compiled kernel's attributes (ptxVersion, binaryVersion),
  // never from the device alone
  EXPECT(max_cluster_for(90, 90, true) == kMaxCluster);     // sm_90 SASS on an H100
  EXPECT(max_cluster_for(90, 100, true) == kMaxCluster);    // compute_90 PTX JIT-compiled for sm_100
  EXPECT(max_cluster_for(100, 100, true) == kMaxCluster);   // built for Blackwell
  EXPECT(max_cluster_for(86, 90, true) == 1);   // "8.0;8.6+PTX" on an H100: compute_86 PTX, no cluster code
  EXPECT(max_cluster_for(80, 90, true) == 1);   // "8.0+PTX" on an H100
  EXPECT(max_cluster_for(80, 80, false) == 1);  // an A100
  EXPECT(max_cluster_for(90, 90, false) == 1);  // a device that refuses cluster launches
  EXPECT(max_cluster_for(0, 90, true) == 1);    // versions the driver cannot tell: no clusters
  // and a row of 128256 then takes the looping kernel, not a 16-CTA cluster
  EXPECT(choose_layout(128256, 8, max_cluster_for(80, 90, true)).loop);
  EXPECT(choose_layout(128256, 8, max_cluster_for(90, 90, true)).cluster == 16);

  // item 4: 60 KB, then 50 KB, then 60 KB of one kernel: one set, and every launch passes
  {
    FakeRuntime rt;
    DynamicSmemOptIns opt_ins;
    EXPECT(rt.launch(opt_ins, 0, 0, 60 * 1024));
    EXPECT(rt.launch(opt_ins, 0, 0, 50 * 1024));
    EXPECT(rt.launch(opt_ins, 0, 0, 60 * 1024));  // failed when 50 KB had lowered the attribute
    EXPECT(rt.sets == 1 && rt.attribute[0][0] == 60 * 1024);
    EXPECT(rt.launch(opt_ins, 0, 0, 1024) && rt.launch(opt_ins, 0, 0, kDefaultDynamicSmem) && rt.sets == 1);
    EXPECT(rt.launch(opt_ins, 0, 0, 70 * 1024) && rt.sets == 2 && rt.attribute[0][0] == 70 * 1024);  // raised
    // another kernel, and the same kernel on another device, hold their own value
    EXPECT(rt.launch(opt_ins, 1, 0, 50 * 1024) && rt.sets == 3 && rt.attribute[1][0] == 50 * 1024);
    EXPECT(rt.launch(opt_ins, 0, 1, 50 * 1024) && rt.sets == 4 && rt.attribute[0][1] == 50 * 1024);
    EXPECT(rt.attribute[0][0] == 70 * 1024);
    // no set for launches within the default, on a fresh kernel either
    EXPECT(rt.launch(opt_ins, 1, 1, kDefaultDynamicSmem) && rt.sets == 4);
  }
  // a set that fails (cudaFuncSetAttribute refused) is not remembered: the next call sets again
  {
    DynamicSmemOptIns opt_ins;
    static const char kernel = 0;
    int calls = 0;
    try {
      opt_ins.allow(&kernel, 0, 60 * 1024, [&](std::size_t) { ++calls; throw std::runtime_error("refused"); });
      EXPECT(false);
    } catch (const std::runtime_error&) {
    }
    opt_ins.allow(&kernel, 0, 60 * 1024, [&](std::size_t bytes) { calls += bytes == 60 * 1024; });
    EXPECT(calls == 2);
  }
  // threads with random sizes: after each allow returns, its launch passes (the value never drops)
  {
    FakeRuntime rt;
    DynamicSmemOptIns opt_ins;
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < 8; ++i)
      threads.emplace_back([&, i] {
        std::mt19937 rng(i);
        for (int j = 0; j < 2000; ++j)
          if (!rt.launch(opt_ins, rng() % 2, rng() % 2, 40 * 1024 + rng() % (60 * 1024))) ++failures;
      });
    for (auto& t : threads) t.join();
    EXPECT(failures == 0);
  }
  std::printf("ok\n");
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_cluster_path_and_shared_memory_opt_in_decided_on_the_host(tmp_path):
    """Issue 24, items 3 and 4, as host arithmetic compiled and run here. The cluster path is chosen
    from the attributes of the code the driver loaded for the kernel (a "8.0;8.6+PTX" build on an
    H100 runs compute_86 PTX without the cluster code: no cluster), and the dynamic shared-memory
    opt-in is kept per (kernel, device) at the largest value set, so 60 KB, 50 KB, 60 KB all launch
    (against a stand-in runtime whose attribute is one value per function)."""
    import subprocess

    exe = _compile_host(tmp_path, LAUNCH_DECISIONS_CHECK, "decisions", "-pthread")
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
    # and the launcher takes these decisions, not the device's compute capability
    launch = (_cuda_build.KERNELS / "kd_launch.cuh").read_text()
    host = (_cuda_build.KERNELS / "kd_kernels.cu").read_text()
    assert "max_cluster_for(a.ptxVersion, a.binaryVersion" in launch
    assert "runs_clusters_of(kernel, l.device, layout.cluster)" in launch
    assert "dynamic_smem_opt_ins().allow(" in launch
    assert launch.count("cudaFuncAttributeMaxDynamicSharedMemorySize") == 1  # only through the record
    assert "ComputeCapability" not in launch + host


NVCC = shutil.which("nvcc") or _cuda_build.os.environ.get("CUDA_HOME")


@pytest.mark.skipif(not NVCC, reason="no CUDA toolkit")
@pytest.mark.parametrize("rows,cols,dtype,budget", [(262144, 10, "float32", 66), (4096, 128256, "bfloat16", 33)])
def test_light_kernel_issue_below_its_memory_time(tmp_path, rows, cols, dtype, budget):
    """The static model on the CUDA backend's light variant (kl_loss, student gradient), compiled for
    sm_90 as launched: no spills, and warp instructions per element within 0.8 of what the memory
    floor allows (12 bytes an element in fp32, 6 in bf16: 83 and 42 instructions at 4.27 TB/s against
    132 SMs x 4 issue x 1.755 GHz). The counting method is in bench/tools/cuda_sass_count.py."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "tools"))
    import cuda_sass_count as sass_count

    m = sass_count.measure(rows, cols, dtype, "kl", tmp_path)
    assert m["spill_bytes"] == 0
    assert m["instr_per_element"] <= budget, m



# ---------------------------------------------------------------------------------------------
# The extension for the architectures a user may name (issue 24). tests/test_packaging.py builds the
# whole extension for sm_90; here the device code is compiled as torch's build compiles it for
# TORCH_CUDA_ARCH_LIST="8.0;9.0" and "8.0+PTX" (its -gencode flags), without the host compile or the
# link, within a CI minute: nvcc -ptx per unit and virtual architecture runs the front end with that
# __CUDA_ARCH__ (NVVM at -O0: what compiles, not how fast); ptxas per real target assembles, for
# each fused unit, its heaviest kernel (every variant, K = 32: the one that runs as a cluster), and
# all of kd_kernels.cu. Embedded PTX (+PTX) is what the driver compiles at load time on a newer
# GPU: assembled here for an H100's sm_90, the case of item 3.
ARCH_LISTS = ["8.0;9.0", "8.0+PTX"]
JIT_TARGET = "90"


def _targets(arch_list):
    """{(virtual arch, ptxas target)} of the -gencode flags torch passes for an arch list."""
    import re

    from torch.utils import cpp_extension

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
        flags = cpp_extension._get_cuda_arch_flags()
    targets = set()
    for flag in flags:
        virtual, kind, code = re.fullmatch(r"-gencode=arch=compute_(\w+),code=(sm|compute)_(\w+)", flag).groups()
        targets.add((virtual, code if kind == "sm" else JIT_TARGET))
    return targets


def _units():
    return [u for u in _cuda_build.SOURCES if u.suffix == ".cu"]


def _toolkit_tool(name):
    return str(Path(_cuda_build.toolkit_root()) / "bin" / name)


@pytest.fixture(scope="module")
def unit_ptx(tmp_path_factory):
    """{(unit, virtual arch): PTX path}: every unit for the arch lists' virtual architectures other than
    sm_90's, which the full build in test_packaging compiles; the bf16 unit for sm_90 too (its
    cluster code and assembly are checked below)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("ptx")
    flags = ["-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS, *_cuda_build.CUDA_FLAGS,
             f"-DFASTKD_HEADERS={_cuda_build.headers_digest()}", "-DTORCH_EXTENSION_NAME=fastkd_cuda",
             *[f"-I{p}" for p in cpp_extension.include_paths("cuda")], "-Xcicc", "-O0"]
    archs = {virtual for arch_list in ARCH_LISTS for virtual, _ in _targets(arch_list)}
    jobs = [(u.name, a) for u in _units() for a in sorted(archs) if a != "90" or u.name == "kd_pair_bf16.cu"]

    def compile_ptx(job):
        name, arch = job
        ptx = out / f"{name}_{arch}.ptx"
        done = subprocess.run([_toolkit_tool("nvcc"), f"-arch=compute_{arch}", "-ptx", *flags,
                               str(_cuda_build.KERNELS / name), "-o", str(ptx)], capture_output=True, text=True)
        assert done.returncode == 0, f"{name} for compute_{arch}:\n{done.stderr[-3000:]}"
        return job, ptx

    with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        return dict(pool.map(compile_ptx, jobs))


def _heaviest_kernel(ptx_text):
    """The heavy build's K = 32 row kernel of the unit's own student and teacher dtype."""
    import re

    entries = re.findall(r"^\.visible \.entry (\w+)\(", ptx_text, re.MULTILINE)
    same = [e for e in entries if re.search(r"kd_rows_kernelI(ff|\d+\w+?S\d*_)Li32ELb0E", e)]  # S_: the type again
    assert len(same) == 1, entries
    return same[0]


@pytest.mark.skipif(not NVCC, reason="no CUDA toolkit")
@pytest.mark.parametrize("arch_list", ARCH_LISTS)
def test_extension_device_code_compiles_for_the_arch_list(arch_list, unit_ptx, tmp_path):
    """Every CUDA unit's device code compiles for the list's architectures (ptxas: see above), and
    only code compiled for sm_90 holds the cluster instructions: a build without it (8.0, or 8.0's
    PTX JIT-compiled on an H100) must never be launched as a cluster (kd_launch.cuh decides from the
    loaded code's ptxVersion; host test above)."""
    import subprocess

    for virtual, target in sorted(_targets(arch_list)):
        for (name, arch), ptx in sorted(unit_ptx.items()):
            if arch != virtual:
                continue
            text = ptx.read_text()
            assert f".target sm_{virtual}" in text
            is_pair = name.startswith("kd_pair_")
            if is_pair:
                assert ("barrier.cluster" in text) == (int(virtual) >= 90), (name, virtual)
            entries = ["-e", _heaviest_kernel(text)] if is_pair else []
            done = subprocess.run([_toolkit_tool("ptxas"), f"-arch=sm_{target}", "-O0", *entries, str(ptx),
                                   "-o", str(tmp_path / "unit.cubin")], capture_output=True, text=True)
            assert done.returncode == 0, f"{name}: compute_{virtual} PTX for sm_{target}:\n{done.stderr[-3000:]}"

# ---------------------------------------------------------------------------------------------
# The kernels' reformulated math, mirrored in float32 NumPy (nothing here runs CUDA): log2-domain
# offsets, a row split into slices merged by (max, rescaled sums), KL / reverse KL from the mean
# difference, JSD in two rounds, the folded gradients, the T = 1 statistics of the meters.

LOG2E, LN2 = np.float32(1.4426950408889634), np.float32(0.6931471805599453)


def _f(x):
    return np.float32(x)


def _fma(a, b, c):  # one rounding, as FFMA
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _offset(m, k):  # offset_of: the rounded product, 0 for an empty slice
    return _f(0) if m == -np.inf else _f(m * k)


def _rescale(m_part, m_all, k):
    return _f(0) if m_part == -np.inf else np.exp2(_offset(m_part, k) - _offset(m_all, k))


def _mirror_row(x, y, label, T, kd_scale, ce_scale, kind, beta, n_slices):
    """(loss, student gradient, teacher gradient, (conf, correct, nll, brier)) of one row, as
    kernels/kd_device.cuh computes them with the row split into n_slices parts (np.fmax is fmaxf:
    it drops NaN, which finite_below relies on)."""
    k = _f(LOG2E / _f(T)) if T != 1 else LOG2E
    inv_t = _f(1 / T)
    parts = []
    for idx in np.array_split(np.arange(x.size), n_slices):
        xs, ys = x[idx], y[idx]
        m_s, m_t = _f(np.max(xs)), _f(np.max(ys))
        es = np.exp2(np.array([_fma(v, k, -_offset(m_s, k)) for v in xs], np.float32))
        et = np.exp2(np.array([_fma(v, k, -_offset(m_t, k)) for v in ys], np.float32))
        e1 = np.exp2(np.array([_fma(v, LOG2E, -_offset(m_s, LOG2E)) for v in xs], np.float32))
        d = (et * np.fmax(ys - xs, -np.finfo(np.float32).max)).sum() if kind == "kl" else \
            (es * np.fmax(xs - ys, -np.finfo(np.float32).max)).sum()
        arg = idx[np.argmax(xs == m_s)]
        parts.append((m_s, m_t, es.sum(), et.sum(), _f(d), e1.sum(), (e1 * e1).sum(), arg))
    m_s = max(p[0] for p in parts)
    m_t = max(p[1] for p in parts)
    z_s = sum(p[2] * _rescale(p[0], m_s, k) for p in parts)
    z_t = sum(p[3] * _rescale(p[1], m_t, k) for p in parts)
    d = sum(p[4] * _rescale(p[1] if kind == "kl" else p[0], m_t if kind == "kl" else m_s, k) for p in parts)
    z1 = sum(p[5] * _rescale(p[0], m_s, LOG2E) for p in parts)
    z2 = sum(p[6] * _rescale(p[0], m_s, LOG2E) ** 2 for p in parts)
    arg = min(p[7] for p in parts if p[0] == m_s)
    off_s, lz_s, off_t, lz_t = _offset(m_s, k), np.log2(z_s), _offset(m_t, k), np.log2(z_t)
    off1, lz1 = _offset(m_s, LOG2E), np.log2(z1)
    prob = lambda v, kk, off, lz: np.exp2(np.array([_fma(a, kk, -off) for a in v], np.float32) - lz)  # noqa: E731
    ps, pt, p1 = prob(x, k, off_s, lz_s), prob(y, k, off_t, lz_t), prob(x, LOG2E, off1, lz1)
    ls_minus_lt = LN2 * ((off_s - off_t) + (lz_s - lz_t))
    kd = _f(kd_scale * inv_t)
    if kind == "jsd":
        la = np.array([_fma(a, k, -off_s) for a in x], np.float32) - lz_s
        lb = np.array([_fma(a, k, -off_t) for a in y], np.float32) - lz_t
        lm = np.log2(np.fmax(beta * pt + (1 - beta) * ps, np.finfo(np.float32).tiny))
        hs, ht = np.fmax(la - lm, -np.finfo(np.float32).max), np.fmax(lb - lm, -np.finfo(np.float32).max)
        ds2, dt2 = (ps * hs).sum(), (pt * ht).sum()
        div = LN2 * (beta * dt2 + (1 - beta) * ds2)
        g_s = (ps * kd * (1 - beta) * LN2) * np.fmax(hs - ds2, -np.finfo(np.float32).max)
        g_t = (pt * kd * beta * LN2) * np.fmax(ht - dt2, -np.finfo(np.float32).max)
    else:
        mu = d / (z_t if kind == "kl" else z_s)
        div = inv_t * mu + (ls_minus_lt if kind == "kl" else -ls_minus_lt)
        if kind == "kl":
            g_s = ps * kd - pt * kd
            g_t = (pt * kd * inv_t) * np.fmax((y - x) - mu, -np.finfo(np.float32).max)
        else:
            g_s = (ps * kd * inv_t) * np.fmax((x - y) - mu, -np.finfo(np.float32).max)
            g_t = kd * (pt - ps)
    nll = (m_s - x[label]) + LN2 * (lz1 - _fma(m_s, LOG2E, -off1))
    g_s = g_s + ce_scale * p1
    g_s[label] -= ce_scale
    brier = z2 / (z1 * z1) - 2 * p1[label] + 1
    conf = np.exp2(_fma(m_s, LOG2E, -off1) - lz1)  # not 1 / z1: the top class's term is 2^residual
    return kd_scale * div + ce_scale * nll, g_s, g_t, (conf, arg == label, nll, brier)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("n_slices", [1, 3, 8])
@pytest.mark.parametrize("shift", [0.0, 700.0], ids=["centred", "large-logits"])
def test_kernel_math_matches_the_float64_reference(kind, n_slices, shift):
    from reference import kd_objective
    from fastkd.calibration import row_statistics

    gen = torch.Generator().manual_seed(7 + n_slices)
    s = (torch.randn(5, 37, generator=gen, dtype=torch.float64) * 3 + shift).float()
    t = (torch.randn(5, 37, generator=gen, dtype=torch.float64) * 3 + shift).float()
    s[1, :5] = t[1, :5] = float("-inf")  # a masked vocabulary
    t[2, 5:9] = float("-inf")  # classes the teacher rules out (reverse KL is then infinite)
    labels = torch.randint(5, 37, (5,), generator=gen)
    T, alpha, beta = 2.5, 0.6, 0.3
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    ref = kd_objective(s64, t64, labels, T, alpha, kind=kind, beta=beta, reduction="none")
    ref_gs, ref_gt = torch.autograd.grad(ref.sum(), (s64, t64))
    conf, correct, nll, brier = row_statistics(s.double(), labels)
    for r in range(5):
        if kind == "reverse_kl" and r == 2:
            continue
        loss, g_s, g_t, meter = _mirror_row(s[r].numpy(), t[r].numpy(), int(labels[r]), T, alpha * T * T, 1 - alpha,
                                            kind, beta, n_slices)
        assert loss == pytest.approx(ref[r].item(), rel=1e-5), (r, "loss")
        scale = ref_gs[r].abs().max().item()
        np.testing.assert_allclose(g_s, ref_gs[r].numpy(), rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(g_t, ref_gt[r].numpy(), rtol=1e-5, atol=1e-5 * ref_gt[r].abs().max().item())
        assert meter[0] == pytest.approx(conf[r].item(), rel=1e-6)
        assert bool(meter[1]) == bool(correct[r])
        assert meter[2] == pytest.approx(nll[r].item(), rel=1e-5, abs=1e-5)
        assert meter[3] == pytest.approx(brier[r].item(), rel=1e-5, abs=1e-6)
