"""Dynamic SASS instructions per element of one variant of the CUDA backend's kernels, on a CPU.

The variant (flags, layout, dtypes) is fixed at compile time (FASTKD_FIXED_*, FASTKD_COUNTING in
kernels/kd_device.cuh), so the cubin for sm_90 holds only the path that variant takes, and the
counting build drops the rare paths the source names (rows that do not exist or are ignored, the
periodic meter flush). It is compiled once per warp role (FASTKD_COUNTING_WARP: warp 0, a row's
first warp, the others), since a row's first warp merges for the rest. The count is: the
instructions of the per-tile loop once, inner loops times their trip counts (the looping kernel's
sweeps), summed over the CTA's warps; per element = that * 32 / the elements a CTA handles per
tile. Code once per CTA (prologue, final flush) is left out: the grid is persistent.

    python bench/tools/cuda_sass_count.py --rows 262144 --cols 10 --dtype float32
    python bench/tools/cuda_sass_count.py --rows 4096 --cols 128256 --dtype bfloat16 --variant kd_meter
    python bench/tools/cuda_sass_count.py --table      # the five DESIGN shapes, markdown
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"  # the CUDA C++ sources
sys.path.insert(0, str(ROOT))

# the host's layout rules, mirrored from launch_limits.h (checked against it by tests/test_cuda_build.py)
BLOCK = 256
MAX_CLUSTER = 16  # Hopper's non-portable cluster size (8 is portable)
ELEM = {"float32": ("float", 4), "bfloat16": ("__nv_bfloat16", 2), "float16": ("__half", 2)}
VARIANTS = {  # name: Flags initialiser fields (see Flags in kd_device.cuh)
    "kl": dict(divergence=0, has_labels=False, has_ce=False, grad_s=True),  # kl_loss, student gradient
    "kl_labels": dict(divergence=0, has_labels=True, has_ce=False, grad_s=True),
    "kd": dict(divergence=0, has_labels=True, has_ce=True, grad_s=True),  # kd_loss, T != 1
    "kd_meter": dict(divergence=0, has_labels=True, has_ce=True, grad_s=True, meter_s=True),
    "kl_teacher_grad": dict(divergence=0, has_labels=False, has_ce=False, grad_s=True, grad_t=True),
    "reverse_kl": dict(divergence=1, has_labels=False, has_ce=False, grad_s=True),
    "jsd": dict(divergence=2, has_labels=False, has_ce=False, grad_s=True),
}
FLAG_ORDER = ["divergence", "has_labels", "has_ce", "same_temp", "grad_s", "grad_t", "meter_s", "meter_t",
              "count_on_device"]
SHAPES = [(262144, 10, "float32"), (65536, 100, "float32"), (8192, 1000, "float32"), (8192, 32000, "bfloat16"),
          (4096, 128256, "bfloat16")]


# the static model's machine (issue 10): 132 SMs, 4 warp instructions and 16 MUFU operations per SM
# per clock at 1.755 GHz, 4.27 TB/s copy bandwidth
SMS, ISSUE, MUFU_RATE, CLOCK, BANDWIDTH = 132, 4, 16, 1.755e9, 4.27e12


def issue_budget(bytes_per_element: float) -> float:
    """Thread instructions per element that take as long to issue as the element's bytes to move."""
    return bytes_per_element / BANDWIDTH * SMS * ISSUE * 32 * CLOCK


def mufu_budget(bytes_per_element: float) -> float:
    """MUFU operations per element that take as long as the element's bytes to move."""
    return bytes_per_element / BANDWIDTH * SMS * MUFU_RATE * CLOCK


def pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


@dataclass
class Layout:
    loop: bool
    k: int
    group: int
    vec: int
    cluster: int
    part_cols: int

    @property
    def rows_per_tile(self) -> int:
        return BLOCK // self.group


def vector_width(cols: int, widest: int) -> int:
    vec = 16 // widest
    while vec > 1 and cols % vec:
        vec //= 2
    return vec


def choose_layout(cols: int, widest: int, max_cluster: int = MAX_CLUSTER) -> Layout:
    """launch_limits.h's choose_layout, for contiguous aligned tensors."""
    vec = vector_width(cols, widest)
    cta_cols = 32 * BLOCK
    if cols <= 16 * 32:
        return Layout(False, 16, pow2_at_least(-(-cols // 16)), vec, 1, cols)
    if cols <= cta_cols:
        return Layout(False, 32, pow2_at_least(-(-cols // 32)), vec, 1, cols)
    if cols <= cta_cols * max_cluster:
        return Layout(False, 32, BLOCK, vec, -(-cols // cta_cols), cta_cols)
    return Layout(True, 16, BLOCK, vec, 1, cols)


def tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    try:  # triton ships cuobjdump / nvdisasm
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    raise SystemExit(f"{name} not found")


def kernel_name(layout: Layout, s_type: str, t_type: str, flags: dict) -> str:
    """The kernel the launcher runs for a layout and variant (kd_launch.cuh: light or heavy build)."""
    light = str(flags.get("divergence", 0) == 0 and not flags.get("grad_t") and not flags.get("meter_t")
                and s_type == t_type).lower()
    return (f"kd_loop_kernel<{s_type}, {t_type}, {light}>" if layout.loop
            else f"kd_rows_kernel<{s_type}, {t_type}, {layout.k}, {light}>")


def compile_variant(layout: Layout, s_type: str, t_type: str, flags: dict, workdir: Path, name: str,
                    warp: int | None = None, fixed: bool = True):
    """(cubin path, ptxas -v text) of the variant's kernel, flags and layout fixed; with `warp`, the
    code that warp of the CTA executes (the leader warps of a row merge for the others). With
    fixed=False, the kernel as launched (flags and layout read at run time)."""
    fields = {**{k: False for k in FLAG_ORDER}, **flags}
    init = "{" + ", ".join(str(fields[k]).lower() if isinstance(fields[k], bool) else str(fields[k])
                           for k in FLAG_ORDER) + "}"
    kernel = kernel_name(layout, s_type, t_type, fields)
    defines = (f"#define FASTKD_COUNTING 1\n#define FASTKD_FIXED_FLAGS {init}\n"
               f"#define FASTKD_FIXED_GROUP {layout.group}\n#define FASTKD_FIXED_VEC {layout.vec}\n"
               f"#define FASTKD_FIXED_CLUSTER {layout.cluster}\n"
               + (f"#define FASTKD_COUNTING_WARP {warp}\n" if warp is not None else "")) if fixed else ""
    src = workdir / f"{name}.cu"
    src.write_text(
        defines + "#include \"kd_device.cuh\"\n"
        f"template __global__ void fastkd::device::{kernel}(const {s_type}*, const {t_type}*, {s_type}*, "
        f"{t_type}*, const __grid_constant__ fastkd::device::Params);\n")
    cubin = workdir / f"{name}.cubin"
    # the flags torch's extension build passes (the conversions they switch off change nothing here)
    torch_like = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                  "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    out = subprocess.run([tool("nvcc"), "-std=c++17", "-O3", "-arch=sm_90", "-cubin", "-I", str(KERNELS), *torch_like,
                          "-Xptxas", "-v", "-o", str(cubin), str(src)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return cubin, out.stderr


@dataclass
class Instr:
    addr: int
    text: str
    opcode: str
    target: str | None  # branch target label


LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def disassemble(cubin: Path):
    """Instructions and label addresses of the (single) kernel in a cubin."""
    text = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = LINE.search(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2)
        for label in pending:
            labels[label] = addr
        pending = []
        op = re.sub(r"^@!?U?P[T0-9]+\s+", "", body).split()[0]
        target = re.search(r"`\((\.L_x_\d+)\)", body)
        instrs.append(Instr(addr, body, op, target.group(1) if target and op.startswith("BRA") else None))
    for label in pending:  # labels after the last instruction
        labels[label] = instrs[-1].addr + 16
    return instrs, labels


def loops(instrs, labels):
    """(head address, back-edge address) of every loop, outermost first."""
    found = [(labels[i.target], i.addr) for i in instrs if i.target and labels[i.target] <= i.addr]
    return sorted(set(found), key=lambda span: span[0] - span[1])


def count(instrs, labels, inner_trips=()):
    """Instructions per tile (the outermost loop once, inner loops times their trips, in order of
    appearance, default 1), MUFU per tile, and the instructions outside the tile loop."""
    spans = loops(instrs, labels)
    if not spans:
        raise SystemExit("no tile loop found")
    head, tail = spans[0]
    inner = sorted(spans[1:], key=lambda span: span[0])
    inner = [span for span in inner if head <= span[0] and span[1] <= tail]
    trips = list(inner_trips) + [1] * (len(inner) - len(inner_trips))
    per_tile = mufu = 0.0
    outside = 0
    for ins in instrs:
        if ins.opcode in ("NOP",):
            continue
        if not head <= ins.addr <= tail:
            outside += 1
            continue
        weight = 1.0
        for (h, t), trip in zip(inner, trips):
            if h <= ins.addr <= t:
                weight *= trip
        per_tile += weight
        if ins.opcode.startswith("MUFU"):
            mufu += weight
    return per_tile, mufu, outside, inner


def resources(ptxas: str):
    regs = int(re.search(r"Used (\d+) registers", ptxas).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    return regs, int(spills.group(1)) + int(spills.group(2))


_LAUNCHED: dict = {}  # kernel as launched -> (registers, spill bytes), compiled once per run


def warp_roles(layout: Layout) -> dict:
    """{warp index: how many of the CTA's warps execute what it does}. Warp 0 does the CTA's
    single-thread work; the first warp of each row's group merges for the group's other warps."""
    warps = BLOCK // 32
    per_group = max(1, layout.group // 32)
    if per_group == 1:
        return {0: 1, 1: warps - 1}
    roles = {0: 1, 1: warps - warps // per_group}
    if warps // per_group > 1:
        roles[per_group] = warps // per_group - 1
    return roles


def measure(rows: int, cols: int, dtype: str, variant: str, workdir: Path, max_cluster: int = MAX_CLUSTER):
    """The counts of one (shape, dtype, variant): per CTA tile, summed over the warps' roles."""
    c_type, widest = ELEM[dtype]
    layout = choose_layout(cols, widest, max_cluster)
    flags = dict(VARIANTS[variant])
    flags["count_on_device"] = flags.get("has_labels", False)
    chunks = -(-cols // (BLOCK * 16))
    sweeps = 3 if variant == "jsd" else 2
    name = f"{variant}_{rows}x{cols}_{dtype}"
    per_cta_tile = mufu_cta = 0.0
    for warp, n_warps in warp_roles(layout).items():
        cubin, _ = compile_variant(layout, c_type, c_type, flags, workdir, f"{name}_w{warp}", warp)
        instrs, labels = disassemble(cubin)
        per_tile, mufu, outside, inner = count(instrs, labels, [chunks] * sweeps if layout.loop else [])
        per_cta_tile += n_warps * per_tile
        mufu_cta += n_warps * mufu
    # registers and spills: of this variant's path (flags fixed), and of the kernel as launched
    cubin, ptxas = compile_variant(layout, c_type, c_type, flags, workdir, name)
    launched = kernel_name(layout, c_type, c_type, flags)
    if launched not in _LAUNCHED:
        _, launched_ptxas = compile_variant(layout, c_type, c_type, flags, workdir, f"{name}_launched", fixed=False)
        _LAUNCHED[launched] = resources(launched_ptxas)
    if layout.loop:
        cta_elements = cols
    else:
        cta_elements = layout.rows_per_tile * min(cols, layout.part_cols) if layout.cluster == 1 else cols / layout.cluster
    regs, spill = resources(ptxas)
    return dict(rows=rows, cols=cols, dtype=dtype, variant=variant, layout=layout, registers=regs,
                spill_bytes=spill, launched_registers=_LAUNCHED[launched][0], launched_spill_bytes=_LAUNCHED[launched][1],
                kernel=launched, instr_per_cta_tile=per_cta_tile,
                instr_per_element=per_cta_tile * 32 / cta_elements, mufu_per_element=mufu_cta * 32 / cta_elements,
                cubin=str(cubin))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=1000)
    ap.add_argument("--dtype", choices=sorted(ELEM), default="float32")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="kl")
    ap.add_argument("--table", action="store_true", help="the five DESIGN shapes, light and kd_meter variants")
    ap.add_argument("--keep", help="keep the cubins in this folder")
    args = ap.parse_args(argv)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fastkd_sass_"))
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = ([(r, c, d, v) for r, c, d in SHAPES for v in ("kl", "kd_meter")] if args.table
            else [(args.rows, args.cols, args.dtype, args.variant)])
    print("| shape | variant | path (group x K, vec, cluster) | registers, spills: this path | as launched "
          "| instr/element | MUFU/element | issue / memory floor | MUFU / memory floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r, c, d, v in jobs:
        m = measure(r, c, d, v, workdir)
        lay = m["layout"]
        path = ("loop, 256 x 16 per chunk" if lay.loop else f"{lay.group} x {lay.k}") + \
            f", vec {lay.vec}" + (f", cluster {lay.cluster}" if lay.cluster > 1 else "")
        bytes_per_element = 3 * ELEM[d][1]
        print(f"| {r} x {c} {d} | {v} | {path} | {m['registers']}, {m['spill_bytes']} B "
              f"| {m['launched_registers']}, {m['launched_spill_bytes']} B | "
              f"{m['instr_per_element']:.1f} | {m['mufu_per_element']:.2f} | "
              f"{m['instr_per_element'] / issue_budget(bytes_per_element):.2f} | "
              f"{m['mufu_per_element'] / mufu_budget(bytes_per_element):.2f} |")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
