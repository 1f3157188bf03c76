"""Static performance model of fastkd's kernels on Hopper (sm_90), without a GPU.

    python bench/tools/roofline.py                # every DESIGN shape and variant, a table
    python bench/tools/roofline.py --json         # one JSON object per (backend, shape, dtype, variant, path)
    python bench/tools/roofline.py --shape 8192x1000:fp32 --variant kl --cubin-dir /tmp/cubins
    python bench/tools/roofline.py --looping      # long rows on the looping path only

For each case the public API (``fastkd.kl_loss`` / ``kd_loss`` and the backward) runs on CPU
tensors of the real shape (allocated, never touched) while every Triton kernel of the backend
is replaced by a recorder: what is compiled is exactly what the launcher asked for (arguments,
constexprs, num_warps, grid), specialised by Triton's own binder for sm_90. Long rows take the
path the launcher takes on an H100: split-row where it applies (a cooperative launch; its wait for
the other parts of a row counted once per row), and those calls are modelled on the looping path
too (what runs under CUDA graph capture). The SASS is then read (bench/tools/sass_count.py) and three
times are compared, per forward + backward:

    memory floor  bytes moved / 4.27 TB/s          (copy bandwidth measured on an H200)
    issue bound   warp instructions / (132 SMs x 4 per clock x 1.755 GHz)
    MUFU bound    MUFU lane ops / (132 SMs x 16 per clock x 1.755 GHz)

The prediction is the largest: a lower bound on time that ranks designs (bench/RESULTS.md says
what the model does not see). The CUDA C++ backend (kernels/kd_kernels.cu) is compiled with nvcc
when there is one and read the same way; its launch geometry lives in its host code, which
``cuda_launches`` below mirrors.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's fastkd, not an installed one
sys.path.insert(1, str(Path(__file__).resolve().parent))

import sm90  # noqa: E402  (drops TRITON_INTERPRET before triton is imported)
import sass_count as sc  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

import fastkd  # noqa: E402

# Hopper, as DESIGN.md and issue #10 fix them
COPY_BANDWIDTH = 4.27e12  # B/s, device-to-device copy measured on an H200
SMS = 132
CLOCK = 1.755e9  # Hz
ISSUE_PER_SM = 4  # warp instructions per clock (4 schedulers)
MUFU_PER_SM = 16  # lane results per clock (CUDA guide, compute capability 9.0: exp2, log2, rcp, ...)
REGISTERS_PER_SM = 65536
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024  # taken by the driver for every resident CTA
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
IN_FLIGHT_TARGET = 24 * 1024  # bytes per SM to cover memory latency at full bandwidth (DESIGN.md)
ISSUE_TARGET = {"light": 0.8, "heavy": 1.2}  # issue bound / memory floor (issue #10)

TEMPERATURE = 2.0
SHAPES = [(8192, 1000, "fp32"), (262144, 10, "fp32"), (65536, 100, "fp32"), (8192, 32000, "bf16"),
          (4096, 128256, "bf16")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPP_TYPES = {"fp32": "float", "bf16": "c10::BFloat16", "fp16": "c10::Half"}


# ---------------------------------------------------------------------------------------------
# what is modelled


@dataclass(frozen=True)
class Variant:
    name: str
    weight: str  # "light" | "heavy": which issue target applies
    labels: bool
    teacher_grad: bool
    loss: Callable  # (s, t, labels) -> the loss, through the public API


def _meter():
    return fastkd.CalibrationMeter()


VARIANTS = [
    Variant("kl", "light", False, False, lambda s, t, y: fastkd.kl_loss(s, t, temperature=TEMPERATURE)),
    Variant("kl+mask", "light", True, False,
            lambda s, t, y: fastkd.kl_loss(s, t, temperature=TEMPERATURE, labels=y)),
    Variant("kd+ce", "light", True, False,
            lambda s, t, y: fastkd.kd_loss(s, t, y, temperature=TEMPERATURE, alpha=0.5)),
    Variant("kd+ce+meter", "light", True, False,
            lambda s, t, y: fastkd.kd_loss(s, t, y, temperature=TEMPERATURE, alpha=0.5, meter=_meter())),
    Variant("jsd", "heavy", False, False,
            lambda s, t, y: fastkd.kd_loss(s, t, temperature=TEMPERATURE, alpha=1.0, divergence="jsd")),
    Variant("reverse_kl", "heavy", False, False,
            lambda s, t, y: fastkd.kd_loss(s, t, temperature=TEMPERATURE, alpha=1.0, divergence="reverse_kl")),
    Variant("kl+teacher_grad", "heavy", False, True,
            lambda s, t, y: fastkd.kl_loss(s, t, temperature=TEMPERATURE)),
    Variant("kd+ce+meters", "heavy", True, False,
            lambda s, t, y: fastkd.kd_loss(s, t, y, temperature=TEMPERATURE, alpha=0.5, meter=_meter(),
                                           teacher_meter=_meter())),
    # the logit transforms of both models (compare with "kl": their cost per element)
    Variant("kl+scale", "light", False, False,
            lambda s, t, y: fastkd.kl_loss(s, t, temperature=TEMPERATURE, student_logit_scale=0.5,
                                           teacher_logit_scale=2.0)),
    Variant("kl+softcap", "heavy", False, False,
            lambda s, t, y: fastkd.kl_loss(s, t, temperature=TEMPERATURE, student_softcap=30.0, teacher_softcap=30.0)),
]


@dataclass(frozen=True)
class Case:
    rows: int
    cols: int
    dtype: str
    variant: Variant
    split: bool = True  # the split-row path where an H100 takes it; False: the looping path

    @property
    def elements(self) -> int:
        return self.rows * self.cols

    @property
    def elem_size(self) -> int:
        return DTYPES[self.dtype].itemsize


# ---------------------------------------------------------------------------------------------
# recording the Triton launcher


def run_forward_backward(case: Case):
    """The public API, forward and backward, on CPU tensors of the real shape. torch.empty only
    reserves address space: nothing reads the logits, the kernels are recorded, not run."""
    dtype = DTYPES[case.dtype]
    s = torch.empty(case.rows, case.cols, dtype=dtype, requires_grad=True)
    t = torch.empty(case.rows, case.cols, dtype=dtype, requires_grad=case.variant.teacher_grad)
    labels = torch.randint(0, case.cols, (case.rows,)) if case.variant.labels else None
    loss = case.variant.loss(s, t, labels)
    torch.autograd.grad(loss, [s, t] if case.variant.teacher_grad else [s])


def record_triton(case: Case) -> list[tuple[sm90.TritonJob, dict, int]]:
    """(compile job, bound arguments by name, number of programs) of each launch, in order."""
    with sm90.split_path(case.split), sm90.recorded_launches() as launches:
        run_forward_backward(case)
    recorded = []
    for launch in launches:
        job, bound = sm90.triton_job(launch.kernel, launch.args, launch.kwargs)
        grid = launch.grid(bound) if callable(launch.grid) else launch.grid
        scalars = {k: v for k, v in bound.items() if isinstance(v, (int, float, bool))}
        recorded.append((job, scalars, math.prod(grid)))
    return recorded


# ---------------------------------------------------------------------------------------------
# one compiled kernel, read


@dataclass
class KernelModel:
    backend: str
    name: str
    cubin: bytes
    programs: int
    threads: int
    registers: int
    stack_bytes: int
    local_ops: int  # LDL/STL instructions: spills
    shared_bytes: int
    per_program: sc.Cost  # per warp, hot path, longest
    per_program_min: sc.Cost  # per warp, hot path, shortest
    tail: sc.Cost  # per warp, once per launch
    loops: list = field(default_factory=list)  # (trips, how)
    pending_load_bytes: int = 0  # per thread
    load_widths: list = field(default_factory=list)
    sweeps: int = 0  # loops over columns that load (0: the row is read once, no loop)
    warnings: list = field(default_factory=list)

    @property
    def warps(self) -> int:
        return max(1, self.threads // 32)

    @property
    def ctas_per_sm(self) -> int:
        regs_per_warp = math.ceil(max(self.registers, 1) * 32 / REGISTER_GRANULE) * REGISTER_GRANULE
        return min(CTAS_PER_SM, REGISTERS_PER_SM // (regs_per_warp * self.warps), THREADS_PER_SM // self.threads,
                   SMEM_PER_SM // (self.shared_bytes + SMEM_RESERVED_PER_CTA))

    @property
    def bytes_in_flight_per_sm(self) -> int:
        return self.pending_load_bytes * self.threads * self.ctas_per_sm

    def warp_instructions(self, cost: str = "per_program") -> float:
        c = getattr(self, cost)
        return self.programs * self.warps * c.instr + self.warps * self.tail.instr

    def warp_mix(self, what: str = "mix") -> dict:
        """Warp instructions of the launch by category (``mix``), opcode or source line."""
        total = {k: v * self.programs * self.warps for k, v in getattr(self.per_program, what).items()}
        for k, v in getattr(self.tail, what).items():
            total[k] = total.get(k, 0) + v * self.warps
        return total

    @property
    def cubin_name(self) -> str:
        name = re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_")[:40]
        return f"{self.backend}_{name}_{hashlib.sha1(self.cubin).hexdigest()[:10]}.cubin"


def read_kernel(backend: str, fn: sc.Function, cubin: bytes, usage: dict, programs: int, threads: int,
                shared: int, trip_count: Callable) -> KernelModel:
    longest = sc.PathCounter(fn, trip_count, "longest")
    shortest = sc.PathCounter(fn, trip_count, "shortest")
    count, count_min = longest.count(), shortest.count()
    main_end = min([i for n, i in fn.labels.items() if n.startswith("$")], default=len(fn.instrs))
    loops = list(sc.all_loops(count.loops))
    sweeps = [lp for lp in loops if not lp.children and longest.blocks[lp.header].start < main_end
              and lp.trips >= 1 and any(sc.is_global_load(i) for i in longest.loop_instrs(lp))
              and not lp.wait and not any(sc.is_spin(i) for i in longest.loop_instrs(lp))]
    # loads in flight where the traffic is: in the sweeps when the row is looped over
    spans = [(longest.blocks[lp.header].start, longest.blocks[lp.latch].end) for lp in sweeps]
    pending, widths = sc.max_pending_load_bytes(fn, spans or None)
    return KernelModel(
        backend=backend, name=fn.name, cubin=cubin, programs=programs, threads=threads,
        registers=usage.get("REG", 0), stack_bytes=usage.get("STACK", 0),
        local_ops=sum(1 for i in fn.instrs if i.op in ("LDL", "STL")), shared_bytes=shared,
        per_program=count.per_program, per_program_min=count_min.per_program, tail=count.tail,
        loops=[(lp.trips, lp.how) for lp in loops], pending_load_bytes=pending, load_widths=widths,
        sweeps=len(sweeps), warnings=count.warnings + count_min.warnings)


def model_triton_launch(job: sm90.TritonJob, scalars: dict, programs: int, compiled: dict) -> KernelModel:
    text = sm90.disassemble(compiled["cubin"])
    functions = sc.parse_sass(text)
    fn = functions[compiled["name"]]
    usage = sm90.resource_usage(compiled["cubin"]).get(compiled["name"], {})
    names = dict(scalars)  # the kernel's arguments by name, for the trip counts of its loops
    names.update({job.signature[path[0]][0]: value for path, value in job.constexprs if len(path) == 1})
    return read_kernel("triton", fn, compiled["cubin"], usage, programs, compiled["num_warps"] * 32,
                       compiled["shared"], sc.triton_trip_count(names))


# ---------------------------------------------------------------------------------------------
# the CUDA C++ backend


@dataclass
class CudaLaunch:
    kernel: str  # demangled prefix, e.g. "kd_fwd_kernel<float, false>"
    grid: int
    threads: int
    dynamic_shared: int
    column_trips: float  # trips of a loop that loads and holds no loop
    row_trips: float  # trips of a loop that holds loops


def cuda_launches(case: Case) -> list[CudaLaunch]:
    """Mirrors the host code of kernels/kd_kernels.cu (``kd_forward``, ``scale_grad``): which
    template instance runs with how many blocks and threads, and how far each loop runs. The only
    place here that knows the CUDA backend's structure: keep it in step with that host code."""
    threads, cap = 256, 16 * SMS
    block_row = case.cols > 1024  # one block per row, else one warp per row
    threads_per_row = threads if block_row else 32
    rows_per_block = threads // threads_per_row
    grid = max(1, min(math.ceil(case.rows / rows_per_block), cap))
    meters = {"kd+ce+meter": 1, "kd+ce+meters": 2}.get(case.variant.name, 0)
    histogram = 8 * meters * (3 * (15 + 1) + 2)
    ctype = CPP_TYPES[case.dtype]
    forward = CudaLaunch(f"kd_fwd_kernel<{ctype}, {str(block_row).lower()}>", grid, threads, histogram,
                         math.ceil(case.cols / threads_per_row), case.rows / (grid * rows_per_block))
    n = case.elements
    scale_grid = max(1, min(math.ceil(n / (threads * 4)), cap))
    backward = CudaLaunch(f"scale_grad_kernel<{ctype}>", scale_grid, threads, 0, n / (scale_grid * threads), 1)
    return [forward] + [backward] * (2 if case.variant.teacher_grad else 1)


@dataclass
class CudaBinary:
    cubin: bytes
    functions: dict  # demangled -> sc.Function
    usage: dict  # demangled -> resource usage


_cuda_binary: dict = {}


def cuda_binary() -> Optional[CudaBinary]:
    if "bin" not in _cuda_binary:
        cubin = sm90.compile_cuda(ROOT / "kernels" / "kd_kernels.cu")
        if cubin is None:
            _cuda_binary["bin"] = None
        else:
            functions = sc.parse_sass(sm90.disassemble(cubin))
            names = sm90.demangle(list(functions))
            usage = sm90.resource_usage(cubin)
            _cuda_binary["bin"] = CudaBinary(cubin, {names[k]: f for k, f in functions.items()},
                                             {names[k]: u for k, u in usage.items() if k in names})
    return _cuda_binary["bin"]


def model_cuda_launch(binary: CudaBinary, launch: CudaLaunch) -> KernelModel:
    matches = [name for name in binary.functions if f"{launch.kernel}(" in name]
    if len(matches) != 1:
        raise RuntimeError(f"kernel {launch.kernel} not found once in kernels/kd_kernels.cu's cubin "
                           f"({len(matches)} matches): update cuda_launches() in bench/tools/roofline.py")
    name = matches[0]
    fn = binary.functions[name]
    usage = binary.usage.get(name, {})
    model = read_kernel("cuda", fn, binary.cubin, usage, launch.grid, launch.threads,
                        usage.get("SHARED", 0) + launch.dynamic_shared,
                        sc.shape_rule_trip_count(launch.column_trips, launch.row_trips))
    model.name = launch.kernel
    return model


# ---------------------------------------------------------------------------------------------
# the three times


def traffic(case: Case, sweeps: int) -> tuple[float, str]:
    """Bytes per element of a forward + backward, and the formula. Each sweep over the columns
    reads s and t (no cache model: a re-read counts as DRAM traffic); each gradient is written
    once; per row, the fp32 loss (and the int64 label) is read or written once. The backward
    moves nothing: grad_output = 1 masks the scale kernel's loads and stores off."""
    size = case.elem_size
    sweeps = max(1, sweeps)
    grads = 1 + case.variant.teacher_grad
    per_row = 4 + (8 if case.variant.labels else 0)
    value = sweeps * 2 * size + grads * size + per_row / case.cols
    formula = (f"{sweeps} sweep{'s' * (sweeps > 1)} x 2 x {size} + {grads} grad x {size} + {per_row}/C"
               f" = {value:.3g}")
    return value, formula


CUBINS: dict = {}  # cubin name -> bytes, for --cubin-dir


def summarise(case: Case, backend: str, kernels: list[KernelModel], path: str) -> dict:
    forward = kernels[0]
    CUBINS.update({k.cubin_name: k.cubin for k in kernels})
    warp_instr = sum(k.warp_instructions() for k in kernels)
    warp_instr_min = sum(k.warp_instructions("per_program_min") for k in kernels)
    mufu_lane_ops = 32 * sum(k.warp_mix().get("mufu", 0) for k in kernels)
    bytes_per_element, formula = traffic(case, forward.sweeps)
    issue_rate = SMS * ISSUE_PER_SM * CLOCK
    t_memory = case.elements * bytes_per_element / COPY_BANDWIDTH * 1e6
    t_issue = warp_instr / issue_rate * 1e6
    t_mufu = mufu_lane_ops / (SMS * MUFU_PER_SM * CLOCK) * 1e6
    mix, by_line = {}, {}
    for k in kernels:
        for cat, v in k.warp_mix().items():
            mix[cat] = mix.get(cat, 0) + v
        for line, v in k.warp_mix("lines").items():
            where = f"{Path(line[0]).name}:{line[1]}" if line else "?"
            by_line[where] = by_line.get(where, 0) + v
    spills = sum(k.local_ops for k in kernels)
    target = ISSUE_TARGET[case.variant.weight]
    return {
        "backend": backend, "rows": case.rows, "cols": case.cols, "dtype": case.dtype,
        "variant": f"{case.variant.weight}:{case.variant.name}", "path": path,
        "registers": forward.registers, "spills": spills, "stack_bytes": forward.stack_bytes,
        "ctas_per_sm": forward.ctas_per_sm, "threads_per_cta": forward.threads,
        "bytes_in_flight_per_sm": forward.bytes_in_flight_per_sm, "load_widths_bytes": forward.load_widths,
        "warp_instructions": warp_instr,
        "instr_per_row": warp_instr * 32 / case.rows,
        "instr_per_element": warp_instr * 32 / case.elements,
        "instr_per_element_min": warp_instr_min * 32 / case.elements,
        "mufu_per_element": mufu_lane_ops / case.elements,
        "bytes_per_element": bytes_per_element, "bytes_formula": formula,
        "t_memory_us": t_memory, "t_issue_us": t_issue, "t_mufu_us": t_mufu,
        "predicted_us": max(t_memory, t_issue, t_mufu),
        "bound": max((t_memory, "memory"), (t_issue, "issue"), (t_mufu, "mufu"))[1],
        "issue_over_memory": t_issue / t_memory,
        "meets_targets": t_issue <= target * t_memory and spills == 0
        and forward.bytes_in_flight_per_sm >= IN_FLIGHT_TARGET,
        "mix_per_element": per_element(mix, case),
        "lines_per_element": per_element(by_line, case, top=15),
        "cubin": forward.cubin_name,
        "kernels": [{
            "name": k.name, "cubin": k.cubin_name, "programs": k.programs, "threads": k.threads,
            "registers": k.registers, "spills": k.local_ops, "shared_bytes": k.shared_bytes,
            "ctas_per_sm": k.ctas_per_sm, "warp_instr_per_program": k.per_program.instr,
            "warp_instr_per_program_min": k.per_program_min.instr, "warp_instr_per_launch_tail": k.tail.instr,
            "loops": [{"trips": t, "how": h} for t, h in k.loops], "load_bytes_pending_per_thread":
            k.pending_load_bytes, "warnings": k.warnings} for k in kernels],
    }


def per_element(warp_counts: dict, case: Case, top: int = 0) -> dict:
    """Thread instructions per element, largest first (the ``top`` largest when given)."""
    ranked = sorted(warp_counts.items(), key=lambda x: -x[1])
    return {k: round(v * 32 / case.elements, 2) for k, v in (ranked[:top] if top else ranked)}


def triton_path(kernel: KernelModel) -> str:
    if kernel.name == "_kd_split_kernel":
        return "split-row"
    return "one-pass" if kernel.sweeps == 0 else f"loop, {kernel.sweeps} sweeps"


# ---------------------------------------------------------------------------------------------
# driving it


def compile_or_error(job: sm90.TritonJob) -> dict:
    """A compile error is a result too: the other cases are still modelled."""
    try:
        return sm90.compile_triton(job)
    except Exception as e:  # any compiler failure, reported with its case
        return {"error": f"{type(e).__name__}: {str(e)[-600:]}"}


def compile_all(jobs: list[sm90.TritonJob], workers: int) -> dict:
    """Each distinct job compiled once, in a few processes when there are many."""
    unique = list(dict.fromkeys(jobs))
    if workers <= 1 or len(unique) < 4:
        return {job: compile_or_error(job) for job in unique}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return dict(zip(unique, pool.map(compile_or_error, unique)))


FAILURES: list[str] = []  # cases that could not be modelled (the exit status says so)


def model_triton(cases: list[Case], workers: int) -> list[dict]:
    recorded = {}
    for case in cases:
        recorded[case] = record_triton(case)
        if case.split and any(job.kernel == "_kd_split_kernel" for job, _, _ in recorded[case]):
            twin = dataclasses.replace(case, split=False)  # the same call on the looping path
            recorded[twin] = record_triton(twin)
    compiled = compile_all([job for launches in recorded.values() for job, _, _ in launches], workers)
    models: dict = {}
    rows = []
    for case, launches in recorded.items():
        errors = [compiled[job]["error"] for job, _, _ in launches if "error" in compiled[job]]
        if errors:
            path = "" if case.split else " (looping path)"
            FAILURES.append(f"triton {case.rows}x{case.cols}:{case.dtype} {case.variant.name}{path}: {errors[0]}")
            continue
        kernels = []
        for job, scalars, programs in launches:
            key = (job, tuple(sorted(scalars.items())), programs)
            if key not in models:
                models[key] = model_triton_launch(job, scalars, programs, compiled[job])
            kernels.append(models[key])
        rows.append(summarise(case, "triton", kernels, triton_path(kernels[0])))
    return rows


def model_cuda(cases: list[Case]) -> list[dict]:
    binary = cuda_binary()
    if binary is None:
        print("no nvcc: the CUDA C++ backend is not modelled", file=sys.stderr)
        return []
    rows = []
    for case in cases:
        try:
            kernels = [model_cuda_launch(binary, launch) for launch in cuda_launches(case)]
        except RuntimeError as e:  # the kernel changed under the mirrored launch rules
            print(f"the CUDA C++ backend is not modelled: {e}; bench/tools/cuda_sass_count.py counts the "
                  "rewritten kernel", file=sys.stderr)
            return []
        per_row = "block" if kernels[0].name.endswith("true>") else "warp"
        rows.append(summarise(case, "cuda", kernels, f"{per_row} per row, {kernels[0].sweeps} sweeps"))
    return rows


def parse_shape(text: str) -> tuple[int, int, str]:
    try:
        dims, dtype = text.split(":") if ":" in text else (text, "fp32")
        rows, cols = (int(x) for x in dims.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 8192x1000:fp32, got {text!r}")
    if dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return rows, cols, dtype


def write_cubins(rows: list[dict], cubins: dict, directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for kernel in row["kernels"]:
            (directory / kernel["cubin"]).write_bytes(cubins[kernel["cubin"]])


def print_table(rows: list[dict]):
    head = ("backend", "shape", "variant", "path", "regs", "spill", "CTA/SM", "KB fly", "LDG B", "instr/elem",
            "(min)", "mufu/elem", "B/elem", "t_mem", "t_issue", "t_mufu", "issue/mem")
    lines = [head]
    for r in rows:
        lines.append((r["backend"], f"{r['rows']}x{r['cols']} {r['dtype']}", r["variant"], r["path"],
                      str(r["registers"]), str(r["spills"]), str(r["ctas_per_sm"]),
                      f"{r['bytes_in_flight_per_sm'] / 1024:.0f}", ",".join(map(str, r["load_widths_bytes"])),
                      f"{r['instr_per_element']:.1f}", f"({r['instr_per_element_min']:.0f})",
                      f"{r['mufu_per_element']:.2f}", f"{r['bytes_per_element']:.2f}", f"{r['t_memory_us']:.1f}",
                      f"{r['t_issue_us']:.1f}", f"{r['t_mufu_us']:.1f}", f"{r['issue_over_memory']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    print("times in us, forward + backward (grad_output = 1); instr = thread instructions (warp instructions x 32)\n"
          "per element, longest hot path (shortest in brackets); KB fly = load bytes in flight per SM; "
          "LDG B = global load widths in bytes")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", type=parse_shape,
                        help="ROWSxCOLS[:dtype], repeatable (default: the five DESIGN shapes)")
    parser.add_argument("--variant", action="append", choices=[v.name for v in VARIANTS],
                        help="repeatable (default: all)")
    parser.add_argument("--backend", action="append", choices=["triton", "cuda"], help="repeatable (default: both)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    parser.add_argument("--looping", action="store_true",
                        help="long rows on the looping path only (no split-row path: as under CUDA graph capture)")
    parser.add_argument("--cubin-dir", type=Path, help="write every compiled kernel there, named as in 'cubin'")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    shapes = args.shape or SHAPES
    variants = [v for v in VARIANTS if not args.variant or v.name in args.variant]
    cases = [Case(r, c, d, v, split=not args.looping) for r, c, d in shapes for v in variants]
    chosen = args.backend or ["triton", "cuda"]
    start = time.time()
    rows = []
    if "triton" in chosen:
        rows += model_triton(cases, args.jobs)
    if "cuda" in chosen:
        rows += model_cuda(cases)
    if args.cubin_dir:
        write_cubins(rows, CUBINS, args.cubin_dir)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
        print(f"kernels of {Path(fastkd.__file__).parent.parent}; triton {triton.__version__}, "
              f"torch {torch.__version__}; modelled in {time.time() - start:.0f} s")
    for failure in FAILURES:
        print("not modelled:", failure, file=sys.stderr)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
