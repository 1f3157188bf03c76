"""Compiles the Triton kernels ahead of time for a real GPU (sm_90) without one: the interpreter
accepts code that the compiler rejects (non-constexpr globals, loop-carried type changes), so the
suite compiles every kernel variant too. Run as a script (TRITON_INTERPRET must be unset):
    python tests/aot_compile.py   -> one line per variant, exit status 1 on a compile error."""
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
# this checkout's kernels: run as a script, sys.path[0] is tests/ and an editable install elsewhere wins
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastkd import _triton_kd as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SCALARS = {"n_rows": "i64", "n_cols": "i64", "stride_s": "i64", "stride_t": "i64", "stride_gs": "i64",
           "stride_gt": "i64", "ignore_index": "i64", "inv_temp": "fp32", "kd_scale": "fp32",
           "ce_scale": "fp32", "beta": "fp32", "inv_count": "fp32", "grad_unit": "fp32",
           "n_elements": "i64"}


def compile_kernel(kernel, pointers: dict, constexprs: dict, num_warps: int):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: pointers.get(n) or SCALARS.get(n) or "constexpr" for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(ASTSource(kernel, signature, consts), target=TARGET, options={"num_warps": num_warps})


def spills(cubin: bytes) -> int:
    """Bytes of stack (register spills) of a compiled kernel, from the cuobjdump Triton bundles."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


def check_default_configs() -> int:
    """The launcher's default configurations compile without register spills (heaviest variant)."""
    failures = 0
    for n_cols, dtype in ((10, "fp32"), (100, "fp32"), (1000, "fp32"), (8192, "fp32"), (16384, "bf16"),
                          (32000, "bf16")):
        size = 4 if dtype == "fp32" else 2
        ptrs = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "labels_ptr": "*i64", "loss_ptr": "*fp32",
                "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "row_count_ptr": "*i64", "edges_ptr": "*fp32",
                "meter_s_ptr": "*fp64", "meter_t_ptr": "*fp64", "partial_ptr": "*fp32", "counter_ptr": "*i32",
                "total_ptr": "*fp32"}
        for divergence, grad_t, meters in ((0, False, False), (1, False, False), (0, False, True),
                                           (0, True, False), (2, False, False), (2, True, True)):
            heavy = grad_t or meters or divergence == 2  # meters: the teacher's too, below
            block_n, block_c, one_pass, warps = K._launch_config(n_cols, size, "", heavy)
            consts = dict(REDUCE=True, BLOCK_N=block_n, BLOCK_C=block_c, ONE_PASS=one_pass, DIVERGENCE=divergence,
                          HAS_LABELS=True, HAS_CE=True, COUNT_ON_DEVICE=True, GRAD_S=True, GRAD_T=grad_t,
                          METER_S=meters, METER_T=meters, NUM_BINS=15, BINS_P2=16, STUDENT_T1=True,
                          LATE_GRAD=divergence != 0 or grad_t)
            kernel = compile_kernel(K._kd_fwd_kernel, ptrs, consts, num_warps=warps)
            stack = spills(kernel.asm["cubin"])
            name = f"default config C={n_cols} {dtype} div={divergence} teacher_grad={grad_t} meters={meters}"
            # a few bytes are a call frame or one spilled scalar; a spilled tile is hundreds
            print(("ok  " if stack <= 16 else "FAIL"), name, f"{block_n}x{block_c} warps={warps} stack={stack}")
            failures += stack > 16
    return failures


def main() -> int:
    failures = check_default_configs()
    # each path x divergence, with three mixes of dtype / gradients / labels+meters
    mixes = (("bf16", True, True, True), ("fp32", True, False, False), ("fp16", False, False, True))
    for (one_pass, block_n, block_c), divergence, (dtype, grad_s, grad_t, labels) in itertools.product(
            ((True, 16, 256), (False, 1, K.LOOP_BLOCK_C)), (0, 1, 2), mixes):
        meters = labels
        ptrs = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "labels_ptr": "*i64", "loss_ptr": "*fp32",
                "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "row_count_ptr": "*i64", "edges_ptr": "*fp32",
                "meter_s_ptr": "*fp64", "meter_t_ptr": "*fp64", "partial_ptr": "*fp32", "counter_ptr": "*i32",
                "total_ptr": "*fp32"}
        consts = dict(REDUCE=labels, BLOCK_N=block_n, BLOCK_C=block_c, ONE_PASS=one_pass, DIVERGENCE=divergence,
                      HAS_LABELS=labels, HAS_CE=labels, COUNT_ON_DEVICE=labels, GRAD_S=grad_s, GRAD_T=grad_t,
                      METER_S=meters, METER_T=meters, NUM_BINS=15, BINS_P2=16, STUDENT_T1=labels,
                      LATE_GRAD=(grad_s and divergence != 0) or (grad_t and divergence != 1))
        name = f"kd_fwd {dtype} one_pass={one_pass} div={divergence} grads={grad_s},{grad_t} labels={labels}"
        try:
            compile_kernel(K._kd_fwd_kernel, ptrs, consts, num_warps=8)
            print("ok  ", name)
        except Exception as e:  # report every variant, fail at the end
            failures += 1
            print("FAIL", name, type(e).__name__, str(e)[-800:])
    for dtype, per_row in itertools.product(("fp32", "bf16"), (False, True)):
        try:
            compile_kernel(K._scale_grad_kernel, {"grad_ptr": f"*{dtype}", "factor_ptr": "*fp32"},
                           dict(FACTOR_PER_ROW=per_row, BLOCK=4096), num_warps=8)
            print("ok   scale_grad", dtype, per_row)
        except Exception as e:
            failures += 1
            print("FAIL scale_grad", dtype, per_row, type(e).__name__, str(e)[-800:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
