"""The compile matrix: every Triton kernel a user can reach, compiled for a real GPU (sm_90) without one.

The suite runs the kernels under the interpreter, which does not specialise arguments, compiles no
branch it does not reach and accepts code the compiler rejects. A GPU launch is different: Triton
turns an integer argument equal to 1 into a Python constant, marks integers divisible by 16 and
16-byte aligned pointers (which decides load widths), passes integers >= 2^31 as int64, and compiles
each constexpr branch taken. So here the public API (kl_loss, kd_loss, sparse_kd_loss, the
vocabulary-parallel losses; forward and backward with a random upstream gradient) runs on CPU tensors
(allocated, never read) while every kernel of the Triton backend records its launches
(bench/tools/sm90.py); each launch is bound and specialised by Triton's own binder and compiled for sm_90:
what a GPU would compile for that call, whatever path the launcher takes. Long rows run twice: with
the split-row path where an H100 takes it (``SPLIT_STATIC``), and on the looping path.

The calls are chosen per specialisation class, not as a product: the launcher's default
configurations with the heaviest variants (checked for register spills, as every job is), the
remaining constexpr branches on each path (checked to be all compiled, both ways), then N = 1, C = 1,
odd C, the large vocabularies, (B, T, C) views with unaligned rows, mixed dtypes, N * C >= 2^31 and a
batch stride >= 2^31, with the heaviest call (and a light one where the class may break it
differently); the sparse-teacher and vocabulary-parallel kernels likewise. Identical compile jobs (the
same kernel, specialisation and constants) are compiled once, in two processes.

Run as a script (TRITON_INTERPRET must be unset):
    python tests/aot_compile.py   -> one line per compile job, exit status 1 on any failure
    python tests/aot_compile.py --record-only   -> the same jobs, recorded and not compiled
    python tests/aot_compile.py --only "1x1000"   -> the calls whose name contains that text
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import inspect
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fastkd, not an installed one
sys.path.insert(1, str(ROOT / "bench" / "tools"))

import sm90  # noqa: E402  (bench/tools/sm90.py: the launch recorder, Triton's binder, the sm_90 target)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fastkd  # noqa: E402

WORKERS = 2
SPILL_LIMIT = 16  # bytes of stack: a call frame or one spilled scalar; a spilled tile is hundreds
# The logit transforms' known spills (bytes of stack). Both softcaps keep the transformed logits of
# student and teacher live through the gradient (for the softcap's slope): in the heaviest one-pass
# variants at the longest fp32 row (8192 columns, 16 elements per thread at 16 warps) two more
# [16]-element tiles per thread, 136 bytes as a launch specialises the arguments (the same variants
# without transforms: 0-16); left so rather than sending those rows to the looping path (5-7 units of
# traffic instead of 3). The looping path's heaviest variant (JSD, both meters, the teacher's
# gradient, both softcaps) at 8 warps: 48 bytes.
TRANSFORM_SPILL_LIMIT = {"one-pass fp32 8192": 160, "looping jsd": 64}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
I64_BATCH_STRIDE = 67109 * 32000  # logits[:, :-1] of a (B, 67110, 32000) tensor: a batch stride >= 2^31


# ---------------------------------------------------------------------------------------------
# the inputs of a call


@dataclass(frozen=True)
class Rows:
    """The student's and teacher's logits of a call. ``view``: "" a contiguous ``shape``; "[:, :-1]",
    "[:, 1:]": that slice of a (B, T + 1, C) tensor (rows not 16-byte aligned unless C allows it);
    "[:, :C]": the first C columns of (N, C + 63) rows (a padded vocabulary sliced); "i64": (B, T, C)
    rows whose batch stride is I64_BATCH_STRIDE (int64 offsets)."""
    shape: tuple
    dtype: str = "bf16"
    t_dtype: str = ""  # the teacher's, when it differs
    view: str = ""

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def n(self) -> int:
        return int(torch.tensor(self.shape[:-1]).prod())

    def logits(self, teacher: bool, requires_grad: bool) -> torch.Tensor:
        dtype = DTYPES[(self.t_dtype or self.dtype) if teacher else self.dtype]
        c = self.cols
        if self.view in ("[:, :-1]", "[:, 1:]"):
            b, t = self.shape[:2]
            base = torch.empty(b, t + 1, c, dtype=dtype)
            x = base[:, :-1] if self.view == "[:, :-1]" else base[:, 1:]
        elif self.view == "[:, :C]":
            x = torch.empty(self.n, c + 63, dtype=dtype)[:, :c]
        elif self.view == "i64":
            b, t = self.shape[:2]
            x = torch.empty(I64_BATCH_STRIDE * (b - 1) + t * c, dtype=dtype).as_strided((b, t, c),
                                                                                        (I64_BATCH_STRIDE, c, 1))
        else:
            x = torch.empty(self.shape, dtype=dtype)
        return x.detach().requires_grad_(requires_grad)  # a leaf view: its gradient is the kernel's

    def __str__(self):
        dtypes = self.dtype + (f"/{self.t_dtype}" if self.t_dtype else "")
        return f"{'x'.join(map(str, self.shape))}{self.view} {dtypes}"


# ---------------------------------------------------------------------------------------------
# the calls


@dataclass(frozen=True)
class Variant:
    name: str
    loss: Callable  # (s, t, labels) -> loss, through the public API
    teacher_grad: bool = False
    student_grad: bool = True


def _meter(num_bins=15):
    return fastkd.CalibrationMeter(num_bins)


TRANSFORMS = dict(student_logit_scale=0.5, teacher_logit_scale=2.0, student_softcap=30.0, teacher_softcap=15.0)
SCALES = dict(student_logit_scale=0.5, teacher_logit_scale=2.0)  # without softcaps: the scale-only branch


def _kd(**kw):
    """kd_loss at T = 2 with the cross-entropy (the meters are only recorded into: one per variant)."""
    return lambda s, t, y, **group: fastkd.kd_loss(s, t, y, temperature=2.0, alpha=0.5, **kw, **group)


def _meters():
    return dict(meter=_meter(), teacher_meter=_meter())


# The launcher's default configurations, heaviest variants (as tests/aot_compile.py always checked
# them for spills): all with labels, the cross-entropy and the in-launch sum.
DEFAULT_VARIANTS = [
    Variant("kl+ce", _kd()),
    Variant("reverse_kl+ce", _kd(divergence="reverse_kl")),
    Variant("kl+ce+meters", _kd(**_meters())),
    Variant("kl+ce teacher_grad", _kd(), teacher_grad=True),
    Variant("jsd+ce", _kd(divergence="jsd")),
    Variant("jsd+ce+meters teacher_grad", _kd(divergence="jsd", **_meters()), teacher_grad=True),
    Variant("kl+ce teacher_grad transforms", _kd(**TRANSFORMS), teacher_grad=True),
    Variant("jsd+ce+meters teacher_grad transforms", _kd(divergence="jsd", **_meters(), **TRANSFORMS),
            teacher_grad=True),
]
DEFAULT_CONFIGS = [Rows((65536, 10), "fp32"), Rows((65536, 100), "fp32"), Rows((65536, 1000), "fp32"),
                   Rows((16384, 8192), "fp32"), Rows((8192, 16384)), Rows((8192, 32000))]

# The constexpr branches the default variants leave out: no labels, labels without the cross-entropy,
# T = 1 (with the cross-entropy and a meter), per-row losses, the scales without softcaps, a meter of
# other bins, no gradient (evaluation with a meter), the teacher's gradient alone.
LIGHT = Variant("kl none", lambda s, t, y: fastkd.kl_loss(s, t, 2.0, "none"))
BRANCH_VARIANTS = [
    Variant("kl", lambda s, t, y: fastkd.kl_loss(s, t, 2.0)),
    Variant("kl+mask T=1 none", lambda s, t, y: fastkd.kl_loss(s, t, 1.0, "none", labels=y)),
    Variant("kd+ce+meter(20 bins) T=1 scales sum",
            lambda s, t, y: fastkd.kd_loss(s, t, y, temperature=1.0, alpha=0.5, meter=_meter(20), reduction="sum",
                                           **SCALES)),
    Variant("jsd+ce+meter no grad", _kd(divergence="jsd", meter=_meter()), student_grad=False),
    Variant("reverse_kl mean teacher_grad only",
            lambda s, t, y: fastkd.kd_loss(s, t, temperature=2.0, alpha=1.0, divergence="reverse_kl", reduction="mean"),
            teacher_grad=True, student_grad=False),
]
# heavy calls of the specialisation classes: every per-row feature at once, on every path (the
# student's meter only: a teacher meter sends long rows to the looping path), and JSD with both
HEAVY = Variant("kl+ce+meter teacher_grad transforms none", _kd(meter=_meter(), reduction="none", **TRANSFORMS),
                teacher_grad=True)
HEAVY_JSD = DEFAULT_VARIANTS[-1]


@dataclass(frozen=True)
class Case:
    """One call of the public API, forward and backward; ``split``: the split-row path allowed where an
    H100 takes it (else long rows take the looping path)."""
    kind: str  # "dense", "sparse", "vocab", "sparse-vocab"
    rows: Rows
    variant: Variant
    split: bool = True
    k: int = 0  # teacher classes listed per row (sparse)

    @property
    def spill_limit(self) -> int:
        if "transforms" in self.variant.name and self.kind == "dense":
            if self.rows.cols == 8192 and self.rows.dtype == "fp32":
                return TRANSFORM_SPILL_LIMIT["one-pass fp32 8192"]
            if self.rows.cols > 8192 and "jsd" in self.variant.name:
                return TRANSFORM_SPILL_LIMIT["looping jsd"]
        return SPILL_LIMIT

    @property
    def name(self) -> str:
        path = "" if self.split or self.rows.cols <= 8192 else " (looping)"
        k = f" K={self.k}" if self.k else ""
        return f"{self.kind} {self.variant.name} {self.rows}{k}{path}"


def dense_cases() -> list[Case]:
    cases = [Case("dense", rows, v) for rows in DEFAULT_CONFIGS for v in DEFAULT_VARIANTS]
    # the same long rows on the looping path (where they went split above)
    long_rows = Rows((8192, 32000))
    cases += [Case("dense", long_rows, v, split=False) for v in DEFAULT_VARIANTS[:2] + DEFAULT_VARIANTS[6:7]]
    # the remaining constexpr branches: one pass (several threads a row, one thread a row), split, looping
    for rows, split, variants in ((Rows((4096, 1000), "fp32"), True, BRANCH_VARIANTS),
                                  (Rows((4096, 10), "fp32"), True, BRANCH_VARIANTS[:3]),
                                  (long_rows, True, BRANCH_VARIANTS), (long_rows, False, BRANCH_VARIANTS)):
        cases += [Case("dense", rows, v, split) for v in variants]
    # the specialisation classes: (rows, variants, paths)
    both = (True, False)
    classes = [
        (Rows((1, 1000), "fp32"), (LIGHT, HEAVY, HEAVY_JSD), (True,)),  # N = 1
        (Rows((1, 32000)), (HEAVY,), both),
        (Rows((5, 1), "fp32"), (LIGHT, HEAVY_JSD), (True,)),  # C = 1
        (Rows((1, 1)), (HEAVY,), (True,)),
        (Rows((9, 3), "fp16"), (HEAVY,), (True,)),  # small odd C
        (Rows((13, 7), "bf16", "fp32"), (HEAVY,), (True,)),
        (Rows((41, 1271), "fp32"), (HEAVY, HEAVY_JSD), (True,)),
        (Rows((3, 32001)), (HEAVY, HEAVY_JSD), both),  # large vocabularies
        (Rows((2, 50257), "fp16"), (HEAVY,), both),
        (Rows((2, 151936)), (HEAVY,), both),
        (Rows((2, 152064), "fp32"), (HEAVY,), both),
        (Rows((3, 151646), view="[:, :C]"), (HEAVY,), both),
        (Rows((2, 5, 1271), view="[:, :-1]"), (LIGHT, HEAVY), (True,)),  # (B, T, C) views
        (Rows((2, 5, 1271), "fp16", view="[:, 1:]"), (HEAVY,), (True,)),
        (Rows((2, 3, 32001), view="[:, :-1]"), (HEAVY,), both),
        (Rows((2, 3, 32000), view="[:, :-1]"), (HEAVY,), (True,)),
        (Rows((7, 1000), "bf16", "fp32"), (HEAVY,), (True,)),  # mixed dtypes
        (Rows((7, 1000), "fp16", "bf16"), (HEAVY,), (True,)),
        (Rows((5, 32000), "fp32", "bf16"), (HEAVY,), (True,)),
        (Rows((14135, 151936)), (HEAVY,), both),  # N * C >= 2^31
        (Rows((2, 3, 32000), view="i64"), (LIGHT,), both),
    ]
    for rows, variants, paths in classes:
        cases += [Case("dense", rows, v, split) for v in variants for split in paths]
    return cases


def _sparse(labels=True, **kw):
    return lambda s, ids, lp, y, **group: fastkd.sparse_kd_loss(s, ids, lp, y if labels else None, temperature=2.0,
                                                                **kw, **group)


SPARSE_VARIANTS = [
    Variant("bucket", _sparse(False, alpha=1.0)),
    Variant("renormalize+ce+meter none", _sparse(alpha=0.5, tail="renormalize", meter=_meter(), reduction="none")),
    Variant("bucket+ce+meter transforms", _sparse(alpha=0.5, meter=_meter(), student_logit_scale=0.5,
                                                   student_softcap=30.0)),
    Variant("renormalize+ce+meter no grad", _sparse(alpha=0.5, tail="renormalize", meter=_meter()),
            student_grad=False),
]


def sparse_cases() -> list[Case]:
    cases = [Case("sparse", rows, v, k=k) for rows, k in ((Rows((64, 4000)), 64), (Rows((16, 32000)), 100))
             for v in SPARSE_VARIANTS]
    for rows, k in ((Rows((1, 1000), "fp32"), 20), (Rows((4, 1), "fp32"), 1), (Rows((9, 1271), "fp16"), 7),
                    (Rows((3, 151646), view="[:, :C]"), 33)):
        cases += [Case("sparse", rows, v, k=k) for v in SPARSE_VARIANTS[:2]]
    # the third tail (TAIL = 2) with a teacher already at T (teacher_power 1): one call
    cases.append(Case("sparse", Rows((64, 4000)), Variant("lumped+ce sampled", _sparse(
        alpha=0.5, tail="lumped", teacher_temperature=2.0)), k=64))
    return cases


VOCAB_VARIANTS = [
    Variant("kl+ce+meters", _kd(**_meters())),
    Variant("jsd teacher_grad", lambda s, t, y, **group: fastkd.kd_loss(s, t, y, temperature=2.0, alpha=1.0,
                                                                        divergence="jsd", **group),
            teacher_grad=True),
    Variant("reverse_kl+ce T=1 none", lambda s, t, y, **group: fastkd.kd_loss(
        s, t, y, temperature=1.0, alpha=0.5, divergence="reverse_kl", reduction="none", **group)),
    Variant("kl", lambda s, t, y, **group: fastkd.kl_loss(s, t, 2.0, **group)),
]


def vocab_cases() -> list[Case]:
    """One rank's slice: a single-rank gloo group runs the real launchers and collectives in-process."""
    cases = [Case("vocab", rows, v) for rows in (Rows((6, 20000)), Rows((1, 1), "fp32"), Rows((5, 37), "fp16"),
                                                 Rows((2, 5, 1271), view="[:, :-1]"))
             for v in VOCAB_VARIANTS]
    cases += [Case("sparse-vocab", rows, SPARSE_VARIANTS[1], k=k) for rows, k in ((Rows((6, 20000)), 50),)]
    return cases


def run(case: Case):
    """The call, forward and backward (a random upstream gradient: its factor is not 1)."""
    v, rows = case.variant, case.rows
    s = rows.logits(False, v.student_grad)
    labels = torch.randint(0, rows.cols, rows.shape[:-1])
    if case.kind in ("sparse", "sparse-vocab"):
        leaves = [s] if v.student_grad else []
        start = torch.randint(0, rows.cols, (*rows.shape[:-1], 1))
        ids = (start + torch.arange(case.k)) % rows.cols  # distinct classes per row
        lp = torch.log_softmax(torch.randn(ids.shape), -1).to(DTYPES[rows.dtype]) - 0.1  # some mass unlisted
        args = (s, ids, lp, labels)
    else:
        t = rows.logits(True, v.teacher_grad)
        leaves = [x for x in (s, t) if x.requires_grad]
        args = (s, t, labels)
    group = {}
    if case.kind in ("vocab", "sparse-vocab"):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        group = dict(group=dist.group.WORLD)
    with torch.set_grad_enabled(bool(leaves)):
        loss = v.loss(*args, **group)
    if leaves:
        torch.autograd.grad(loss, leaves, torch.rand(loss.shape))


def record(case: Case) -> list[sm90.TritonJob]:
    with sm90.split_path(case.split), sm90.recorded_launches() as launches:
        run(case)
    return [sm90.triton_job(launch.kernel, launch.args, launch.kwargs)[0] for launch in launches]


# ---------------------------------------------------------------------------------------------
# compiling


def _kernel(job: sm90.TritonJob):
    return getattr(importlib.import_module(job.module), job.kernel)


def declared_constants(job: sm90.TritonJob) -> dict:
    """The kernel's own constexprs in a job (not the arguments Triton specialised to constants)."""
    declared = {p.name for p in _kernel(job).params if p.is_constexpr}
    names = [name for name, _ in job.signature]
    return {names[path[0]]: value for path, value in job.constexprs if names[path[0]] in declared}


def constants(job: sm90.TritonJob) -> str:
    """The kernel's own constexprs and its warps."""
    values = [f"{k}={v}" for k, v in declared_constants(job).items()]
    return " ".join(values + [f"num_warps={dict(job.options)['num_warps']}"])


def specialisation(job: sm90.TritonJob) -> str:
    """How Triton specialised the job's arguments: integers passed as constants (== 1), as int64
    (>= 2^31), divisible by 16; pointers not 16-byte aligned."""
    declared = {p.name for p in _kernel(job).params if p.is_constexpr}
    names = [name for name, _ in job.signature]
    consts = {names[path[0]] for path, _ in job.constexprs}
    hinted = {names[path[0]] for path, attrs in job.attrs if attrs}
    ones = [f"{n}=1" for n in names if n in consts and n not in declared]
    i64 = [n for n, ty in job.signature if ty == "i64"]
    div16 = [n for n, ty in job.signature if ty in ("i32", "i64") and n in hinted]
    unaligned = [n for n, ty in job.signature if ty.startswith("*") and n not in hinted]
    parts = [("constant", ones), ("i64", i64), ("%16", div16), ("unaligned", unaligned)]
    return "; ".join(f"{what}: {' '.join(names)}" for what, names in parts if names)


def _cpu_seconds() -> float:
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def compile_job(job: sm90.TritonJob) -> dict:
    """{"stack": bytes of stack, "registers", "cpu": seconds} of the compiled kernel, or {"error": the
    compiler's message}."""
    start = _cpu_seconds()
    try:
        compiled = sm90.compile_triton(job)
        usage = sm90.resource_usage(compiled["cubin"]).get(compiled["name"], {})
        return {"stack": usage.get("STACK", 0), "registers": usage.get("REG", 0), "cpu": _cpu_seconds() - start}
    except Exception as e:  # any compiler failure: reported with the kernel, the calls and the arguments
        return {"error": f"{type(e).__name__}: {str(e)[-1500:]}", "cpu": _cpu_seconds() - start}


def compile_all(jobs: list, workers: int) -> dict:
    if workers <= 1:
        return {job: compile_job(job) for job in jobs}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return dict(zip(jobs, pool.map(compile_job, jobs)))


# Constexpr switches that have one value on a GPU: the approximate per-row math (off only under the
# interpreter) and the split kernel's one cooperative launch (PHASE 1 and 2: the interpreter's halves);
# and those that one path of the dense kernel never sets: JSD's third sweep (looping only), the row
# length compiled in (one pass only, one thread a row).
ONE_VALUE_ON_A_GPU = {"FAST_MATH", "PHASE"}
NOT_ON_THE_PATH = {("_kd_fwd_kernel", "ONE_PASS=True"): {"THIRD_SWEEP"},
                   ("_kd_fwd_kernel", "ONE_PASS=False"): {"N_COLS"}}


def uncovered_branches(jobs) -> list[str]:
    """The constexpr branches a user reaches that no job compiled: every boolean constexpr of every
    kernel both ways (the dense kernel per path: one pass, looping), every divergence each kernel
    handles, every tail of the sparse kernel, the one-pass dense kernel with the row length compiled
    in (N_COLS > 0) and without."""
    seen: dict = {}  # (kernel, path) -> constexpr -> values
    for job in jobs:
        consts = declared_constants(job)
        path = f"ONE_PASS={consts.pop('ONE_PASS')}" if job.kernel == "_kd_fwd_kernel" else ""
        for name, value in consts.items():
            value = value > 0 if name == "N_COLS" else value
            seen.setdefault((job.kernel, path), {}).setdefault(name, set()).add(value)
    missing = []
    for (kernel, path), values in sorted(seen.items()):
        skip = ONE_VALUE_ON_A_GPU | NOT_ON_THE_PATH.get((kernel, path), set())
        for name, got in sorted(values.items()):
            if name == "DIVERGENCE":
                want = {0, 1} if kernel == "_kd_split_kernel" else {0, 1, 2}
            elif name == "TAIL":  # the sparse kernel's Tail codes: bucket, renormalize, lumped
                want = {0, 1, 2}
            elif name in skip or not all(isinstance(v, bool) for v in got):
                continue
            else:
                want = {False, True}
            if want - got:
                missing.append(f"{kernel}{f' [{path}]' if path else ''}: {name} never {sorted(want - got)}")
    return missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record-only", action="store_true", help="record and list the jobs, compile nothing")
    parser.add_argument("--only", help="the calls whose name contains this text (no coverage check)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="compile processes")
    args = parser.parse_args(argv)
    start = time.time()
    cases = [c for c in dense_cases() + sparse_cases() + vocab_cases() if not args.only or args.only in c.name]
    users: dict = {}  # job -> the calls that launched it
    failures = 0
    launches = 0
    for case in cases:
        try:
            jobs = record(case)
        except Exception as e:  # the launcher itself failed on the CPU: the case is reported, the rest goes on
            failures += 1
            print(f"FAIL {case.name}: the call failed before compiling: {type(e).__name__}: {e}")
            continue
        if not jobs:
            failures += 1
            print(f"FAIL {case.name}: launched no Triton kernel")
        launches += len(jobs)
        for job in jobs:
            users.setdefault(job, []).append(case)
    recorded = time.time() - start
    if args.record_only:
        results = {job: {"stack": 0, "registers": 0, "cpu": 0.0} for job in users}
    else:
        results = compile_all(list(users), args.workers)
    by_kernel: dict = {}  # kernel -> [jobs, CPU seconds]
    for job, result in results.items():
        count = by_kernel.setdefault(job.kernel, [0, 0.0])
        count[0] += 1
        count[1] += result["cpu"]
        callers = users[job]
        where = callers[0].name + (f" (+{len(callers) - 1} more calls)" if len(callers) > 1 else "")
        if "error" in result:
            failures += 1
            print(f"FAIL {job.kernel} from {where}\n     constants: {constants(job)}\n"
                  f"     arguments: {specialisation(job)}\n     calls: {'; '.join(c.name for c in callers[:6])}\n"
                  f"     {result['error']}")
            continue
        limit = max(c.spill_limit for c in callers)
        ok = result["stack"] <= limit
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {job.kernel} stack={result['stack']}{'' if ok else f' > {limit}'} "
              f"regs={result['registers']} cpu={result['cpu']:.1f}s from {where} [{specialisation(job)}]")
    for gap in ([] if args.only else uncovered_branches(users)):
        failures += 1
        print(f"FAIL constexpr branch not compiled: {gap}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"summary: {len(cases)} calls, {launches} launches, {len(results)} distinct compile jobs "
          f"({', '.join(f'{k} {n} in {cpu:.0f} CPU s' for k, (n, cpu) in sorted(by_kernel.items()))}); "
          f"recorded in {recorded:.0f} s, compiled in {time.time() - start - recorded:.0f} s; peak RSS {rss} MB; "
          f"{failures} failures")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# hand-built compile jobs (tests/test_vocab_parallel.py compiles its kernels with these)

SCALARS = {"n_rows": "i64", "n_cols": "i64", "n_inner": "i64", "stride_so": "i64", "stride_si": "i64",
           "stride_to": "i64", "stride_ti": "i64", "blocks_per_program": "i32", "n_groups": "i32",
           "rows_per_group": "i32", "ignore_index": "i64", "inv_temp": "fp32", "kd_scale": "fp32",
           "ce_scale": "fp32", "beta": "fp32", "inv_count": "fp32", "grad_unit": "fp32",
           "n_elements": "i64", "n_k": "i64", "stride_s": "i64", "stride_k": "i64", "stride_gs": "i64",
           "tail_floor": "fp32", "s_scale": "fp32", "t_scale": "fp32", "s_cap": "fp32", "t_cap": "fp32", "t_power": "fp32"}


def compile_kernel(kernel, pointers: dict, constexprs: dict, num_warps: int, aligned: bool = False):
    """A kernel compiled for sm_90 from hand-given argument types (every integer i64, nothing
    specialised unless ``aligned``: 16-byte aligned pointers)."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: pointers.get(n) or SCALARS.get(n) or "constexpr" for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if aligned and n in pointers}
    return triton.compile(ASTSource(kernel, signature, consts, attrs), target=sm90.TARGET,
                          options={"num_warps": num_warps})


def spills(cubin: bytes) -> int:
    """Bytes of stack (register spills) of a compiled kernel."""
    tool = sm90.TOOLS / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


if __name__ == "__main__":
    sys.exit(main())
