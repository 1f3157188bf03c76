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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastkd, not an installed one

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastkd import _triton_kd as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SCALARS = {"n_rows": "i64", "n_cols": "i64", "n_inner": "i64", "stride_so": "i64", "stride_si": "i64",
           "stride_to": "i64", "stride_ti": "i64", "blocks_per_program": "i32", "n_groups": "i32",
           "rows_per_group": "i32", "ignore_index": "i64", "inv_temp": "fp32", "kd_scale": "fp32",
           "ce_scale": "fp32", "beta": "fp32", "inv_count": "fp32", "grad_unit": "fp32",
           "n_elements": "i64", "n_k": "i64", "stride_s": "i64", "stride_k": "i64", "stride_gs": "i64",
           "tail_floor": "fp32", "s_scale": "fp32", "t_scale": "fp32", "s_cap": "fp32", "t_cap": "fp32"}


def compile_kernel(kernel, pointers: dict, constexprs: dict, num_warps: int, aligned: bool = False):
    """``aligned``: as a launch specialises 16-byte aligned pointers and integers divisible by 16
    (tt.divisibility 16); else nothing is known (the worst case: unaligned views)."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: pointers.get(n) or SCALARS.get(n) or "constexpr" for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if aligned and n in pointers}
    return triton.compile(ASTSource(kernel, signature, consts, attrs), target=TARGET,
                          options={"num_warps": num_warps})


def spills(cubin: bytes) -> int:
    """Bytes of stack (register spills) of a compiled kernel, from the cuobjdump Triton bundles."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


POINTERS = {"labels_ptr": "*i64", "loss_ptr": "*fp32", "row_count_ptr": "*i64", "edges_ptr": "*fp32",
            "meter_s_ptr": "*fp64", "meter_t_ptr": "*fp64", "partial_ptr": "*fp32", "counter_ptr": "*i32",
            "total_ptr": "*fp32", "stats_ptr": "*fp32", "arrive_ptr": "*i32"}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# logit transforms, all four set (student and teacher scale and softcap): KDSpec's last fields
TRANSFORMS = (0.5, 2.0, 30.0, 15.0)


def launcher_constants(n_rows, n_cols, dtype, divergence, grad_s, grad_t, labels, meters, rows_3d=False,
                       split_ok=True, teacher_meter=None, transforms=(1.0, 1.0, 0.0, 0.0)):
    """(kernel, constants, warps) exactly as the launcher (K._plan) picks them for such a call."""
    import torch
    from fastkd._core.spec import KDSpec

    spec = KDSpec(0.5, 1.0, 0.5 if labels else 0.0, divergence, 0.5, -100, 0.0, *transforms)
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    rows = (7, None, n_cols, None, n_cols) if rows_3d else (1, None, 0, None, 0)
    teacher_meter = meters if teacher_meter is None else teacher_meter
    plan = K._plan(n_rows, n_cols, torch_dtype, torch_dtype, spec, grad_s, grad_t, labels, meters, teacher_meter,
                   labels, "", rows, split_ok=split_ok)
    return plan["kernel"], dict(plan["consts"], COUNT_ON_DEVICE=labels), plan["num_warps"]


# The logit transforms' known spill: both softcaps keep the transformed logits of student and teacher
# live through the gradient (for the softcap's slope), two more [16]-element tiles per thread in the
# heaviest one-pass variants at the longest fp32 row (8192 columns, 16 elements per thread at 16
# warps): 56-112 bytes of stack (the same variants without transforms: 0-8). Left so rather than
# sending those rows to the looping path (5-7 units of traffic instead of 3); every other transform
# variant stays within the common limit.
SPILL_LIMIT = 16
TRANSFORM_SPILL_LIMIT = {(8192, "fp32"): 128}


def check_default_configs() -> int:
    """The launcher's default configurations compile without register spills (heaviest variant); with
    the logit transforms, the two heaviest variants too (within TRANSFORM_SPILL_LIMIT where listed)."""
    failures = 0
    for n_cols, dtype in ((10, "fp32"), (100, "fp32"), (1000, "fp32"), (8192, "fp32"), (16384, "bf16"),
                          (32000, "bf16")):
        ptrs = dict(POINTERS, s_ptr=f"*{dtype}", t_ptr=f"*{dtype}", gs_ptr=f"*{dtype}", gt_ptr=f"*{dtype}")
        for divergence, grad_t, meters, transforms in (
                (0, False, False, None), (1, False, False, None), (0, False, True, None), (0, True, False, None),
                (2, False, False, None), (2, True, True, None), (0, True, False, TRANSFORMS),
                (2, True, True, TRANSFORMS)):
            fn, consts, warps = launcher_constants(65536, n_cols, dtype, divergence, True, grad_t, True, meters,
                                                   transforms=transforms or (1.0, 1.0, 0.0, 0.0))
            kernel = compile_kernel(fn, ptrs, consts, num_warps=warps, aligned=True)
            stack = spills(kernel.asm["cubin"])
            name = (f"default config C={n_cols} {dtype} div={divergence} teacher_grad={grad_t} meters={meters}"
                    + (" transforms" if transforms else ""))
            shape = f"{consts.get('BLOCK_N', consts.get('PARTS'))}x({consts['VECS']}x{consts['LANES']}x{consts['VEC']})"
            # a few bytes are a call frame or one spilled scalar; a spilled tile is hundreds
            limit = TRANSFORM_SPILL_LIMIT.get((n_cols, dtype), SPILL_LIMIT) if transforms else SPILL_LIMIT
            print(("ok  " if stack <= limit else "FAIL"), name, f"{shape} warps={warps} stack={stack}")
            failures += stack > limit
    return failures


def main() -> int:
    failures = check_default_configs()
    # each path (one pass; long rows split or swept) x divergence, with three mixes of dtype /
    # gradients / labels+meters (the split path takes the student's meter only); (B, T, C) views
    mixes = (("bf16", True, True, True), ("fp32", True, False, False), ("fp16", False, False, True))
    long_row = K.ONE_PASS_MAX["light"][4] * 2
    for (n_cols, rows_3d, split_ok), divergence, (dtype, grad_s, grad_t, labels) in itertools.product(
            ((256, False, True), (long_row, True, True), (long_row, False, False)), (0, 1, 2), mixes):
        ptrs = dict(POINTERS, s_ptr=f"*{dtype}", t_ptr=f"*{dtype}", gs_ptr=f"*{dtype}", gt_ptr=f"*{dtype}")
        fn, consts, warps = launcher_constants(4096, n_cols, dtype, divergence, grad_s, grad_t, labels, labels,
                                               rows_3d, split_ok, labels and not (split_ok and n_cols > 256))
        path = "split" if fn is K._kd_split_kernel else "one_pass" if consts["ONE_PASS"] else "sweeps"
        name = (f"kd_fwd {dtype} C={n_cols} {path} rows_3d={rows_3d} div={divergence} "
                f"grads={grad_s},{grad_t} labels={labels}")
        try:
            compile_kernel(fn, ptrs, consts, num_warps=warps)
            print("ok  ", name)
        except Exception as e:  # report every variant, fail at the end
            failures += 1
            print("FAIL", name, type(e).__name__, str(e)[-800:])
    # each path x divergence with both models' logit transforms (scale and softcap)
    for (n_cols, rows_3d, split_ok), divergence in itertools.product(
            ((256, False, True), (long_row, True, True), (long_row, False, False)), (0, 1, 2)):
        ptrs = dict(POINTERS, s_ptr="*bf16", t_ptr="*bf16", gs_ptr="*bf16", gt_ptr="*bf16")
        fn, consts, warps = launcher_constants(4096, n_cols, "bf16", divergence, True, True, True, True, rows_3d,
                                               split_ok, not (split_ok and n_cols > 256), TRANSFORMS)
        path = "split" if fn is K._kd_split_kernel else "one_pass" if consts["ONE_PASS"] else "sweeps"
        name = f"kd_fwd transforms bf16 C={n_cols} {path} div={divergence}"
        try:
            compile_kernel(fn, ptrs, consts, num_warps=warps)
            print("ok  ", name)
        except Exception as e:
            failures += 1
            print("FAIL", name, type(e).__name__, str(e)[-800:])
    for dtype, per_row in itertools.product(("fp32", "bf16"), (False, True)):
        try:
            compile_kernel(K._scale_grad_kernel, {"grad_ptr": f"*{dtype}", "factor_ptr": "*fp32"},
                           dict(FACTOR_PER_ROW=per_row, BLOCK_R=256, BLOCK_C=16, VEC=2), num_warps=8)
            print("ok   scale_grad", dtype, per_row)
        except Exception as e:
            failures += 1
            print("FAIL scale_grad", dtype, per_row, type(e).__name__, str(e)[-800:])
    return 1 if failures + check_sparse() else 0


def check_sparse() -> int:
    """The sparse-teacher kernel: each path x tail x (dtype, labels + meter), and each path with the
    student's logit transforms, without spills."""
    from fastkd import _triton_sparse as S

    failures = 0
    for (n_cols, one_pass), bucket, (dtype, labels, transforms) in itertools.product(
            ((4000, True), (32000, False)), (True, False),
            (("bf16", True, False), ("fp32", False, False), ("bf16", True, True))):
        if transforms and not bucket:
            continue
        ptrs = dict(POINTERS, s_ptr=f"*{dtype}", ids_ptr="*i64", lp_ptr=f"*{dtype}", gs_ptr=f"*{dtype}",
                    meter_ptr="*fp64")
        block_c = 4096 if one_pass else S.LOOP_BLOCK_C
        consts = dict(BLOCK_C=block_c, BLOCK_K=64, ONE_PASS=one_pass, BUCKET=bucket, HAS_LABELS=labels,
                      HAS_CE=labels, COUNT_ON_DEVICE=labels, GRAD_S=True, METER=labels, NUM_BINS=15, BINS_P2=16,
                      STUDENT_T1=labels, S_SCALE=transforms, S_CAP=transforms, FAST_MATH=True)
        name = (f"sparse {dtype} C={n_cols} one_pass={one_pass} bucket={bucket} labels+meter={labels}"
                + (" transforms" if transforms else ""))
        try:
            stack = spills(compile_kernel(S._sparse_kd_fwd_kernel, ptrs, consts, num_warps=16).asm["cubin"])
            print("ok  " if stack <= 16 else "FAIL", name, f"stack={stack}")
            failures += stack > 16
        except Exception as e:
            failures += 1
            print("FAIL", name, type(e).__name__, str(e)[-800:])
    return failures


if __name__ == "__main__":
    sys.exit(main())
