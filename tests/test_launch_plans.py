"""The Triton launcher's plans, checked as host arithmetic over many shapes, dtypes, options and SM
counts (no kernel runs): what the interpreter cannot see (DESIGN.md), a compiled launch depends on.
Rows per program within the meters' packed counters, grid and row indices within their integer
types, vector widths dividing C, the strides and the base addresses, tiles covering their rows, the
split path's cooperative grid within what the device holds; and the occupancy arithmetic that sizes
that grid from a compiled kernel, with stand-in kernels and device properties."""
import inspect
import random
from types import SimpleNamespace

import pytest
import torch

from fastkd._core.spec import KDSpec

pytest.importorskip("triton")
from fastkd.backends.triton import helpers as H  # noqa: E402  (the meters' packing constants)
from fastkd.backends.triton import launch as L  # noqa: E402  (the launch state, the split path's fit)
from fastkd.backends.triton import plan as P  # noqa: E402  (the plans and their knobs)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMS = (16, 58, 114, 132)
# vocabularies of real models, the one-pass limit and its neighbours, small odd widths
SPECIAL_COLS = (1, 2, 3, 10, 100, 1000, 4095, 8191, 8192, 8193, 32000, 32001, 50257, 128256, 151936, 152064,
                262144)


def is_pow2(x):
    return x >= 1 and x & (x - 1) == 0


def random_case(rng):
    """Keyword arguments of one _plan call, as kd_forward would make them."""
    n = max(1, int(2 ** rng.uniform(0, 20)))
    c = rng.choice(SPECIAL_COLS) if rng.random() < 0.4 else max(1, int(2 ** rng.uniform(0, 18)))
    if rng.random() < 0.3:  # a multiple of 8: 16-byte vectors where the strides and addresses allow
        c = -(-c // 8) * 8
    s_dtype, t_dtype = rng.choice(DTYPES), rng.choice(DTYPES)
    if rng.random() < 0.3:  # a (B, T, C) view read in place: row r at (r // T) outer + (r % T) inner
        n_inner = rng.randint(2, 64)
        n = max(1, n // n_inner) * n_inner
        si = c + rng.choice((0, 0, 0, 1, 8, 13))
        ti = c + rng.choice((0, 0, 0, 2, 64))
        rows = (n_inner, si * (n_inner + rng.choice((0, 1))), si, ti * (n_inner + rng.choice((0, 1))), ti)
    elif rng.random() < 0.5:  # contiguous rows
        rows = (1, None, 0, None, 0)
    else:  # rows of a wider buffer (a slice), or contiguous
        rows = (1, c + rng.choice((0, 0, 1, 3, 8, 100)), 0, c + rng.choice((0, 0, 2, 16)), 0)
    # base addresses: 256-byte aligned allocations, or a view starting some elements in
    addresses = tuple(256 * rng.randint(1, 1 << 20) + rng.choice((0, 0, 0, 0, 1, 2, 7)) * dt.itemsize
                      for dt in (s_dtype, t_dtype))
    divergence = rng.randint(0, 2)
    has_labels = rng.random() < 0.6
    grad_s, grad_t = rng.random() < 0.8, rng.random() < 0.3
    meters = rng.random() < 0.5
    spec = KDSpec(rng.choice((1.0, 0.5, 0.25)), 1.0, 0.5 if has_labels and rng.random() < 0.5 else 0.0,
                  divergence, 0.5, -100, rng.choice((0.0, 0.0, 0.5)),
                  *(rng.choice(((1.0, 1.0, 0.0, 0.0), (0.5, 2.0, 0.0, 0.0), (1.0, 1.0, 30.0, 15.0)))))
    return dict(n=n, c=c, s_dtype=s_dtype, t_dtype=t_dtype, spec=spec, grad_s=grad_s, grad_t=grad_t,
                has_labels=has_labels, meter_s=meters, meter_t=meters and rng.random() < 0.5,
                reduce=rng.random() < 0.5, rows=rows, addresses=addresses, split_ok=rng.random() < 0.7,
                sms=rng.choice(SMS), fast_math=True)


def check_plan(case, plan):
    n, c = case["n"], case["c"]
    consts, ints = plan["consts"], plan["ints"]
    n_inner, so, si, to, ti = case["rows"]
    strides = [c if so is None else so, si, c if to is None else to, ti]
    assert ints["n_rows"] == n and ints["n_cols"] == c
    assert [ints["stride_so"], ints["stride_si"], ints["stride_to"], ints["stride_ti"]] == strides
    assert consts["ROWS_3D"] == (n_inner > 1)
    params = inspect.signature(plan["kernel"].fn).parameters  # the launch binds by these names
    assert set(consts) <= set(params) and set(ints) <= set(params)

    # vector loads: VEC elements (at most 16 bytes) of both tensors at every row start
    vec = consts["VEC"]
    assert is_pow2(vec) and vec * max(case["s_dtype"].itemsize, case["t_dtype"].itemsize) <= 16
    assert c % vec == 0 and all(st % vec == 0 for st in strides)
    for address, dtype in zip(case["addresses"], (case["s_dtype"], case["t_dtype"])):
        assert address % (vec * dtype.itemsize) == 0
    assert is_pow2(consts["VECS"]) and is_pow2(consts["LANES"]) and is_pow2(plan["num_warps"])
    assert plan["num_warps"] <= 32 and 1 <= plan["programs"] < 2**31  # a 1-D grid
    chunk = consts["VECS"] * consts["LANES"] * vec

    meters = case["meter_s"] or case["meter_t"]
    if meters:  # the packed counts (count + PACK * correct per bin) are exact up to PACK_ROWS rows
        assert 1 <= plan["meter_rows"] <= H.PACK_ROWS.value

    if plan["path"] == "split-row":
        parts, groups = consts["PARTS"], ints["n_groups"]
        spec = case["spec"]
        # what the split kernel implements: KL or reverse KL with a gradient, the student's meter only
        assert spec.divergence in (0, 1) and (case["grad_s"] or case["grad_t"]) and not case["meter_t"]
        assert case["split_ok"] and c > P.ONE_PASS_MAX["light"][4]
        assert consts["LANES"] == 32 * plan["num_warps"] and plan["kernel"] is P._kd_split_kernel
        assert 1 <= parts <= P.SPLIT_MAX_PARTS and consts["PARTS_P2"] == 1 << (parts - 1).bit_length()
        assert (parts - 1) * chunk < c <= parts * chunk  # every part holds columns, together the row
        assert 1 <= groups <= n and plan["programs"] == groups * parts
        assert groups * parts <= case["sms"] * P.SPLIT_PROGRAMS_PER_SM  # all resident at once
        assert ints["rows_per_group"] * groups >= n and (ints["rows_per_group"] - 1) * groups < n
        assert ints["rows_per_group"] * groups < 2**31  # the kernel's int32 row index
        assert plan["meter_rows"] == min(ints["rows_per_group"], H.PACK_ROWS.value)
        return

    block_n, per_program = consts["BLOCK_N"], ints["blocks_per_program"]
    assert plan["kernel"] is P._kd_fwd_kernel and is_pow2(block_n) and per_program >= 1
    rows_per_program = block_n * per_program
    assert plan["meter_rows"] == rows_per_program
    # every row has a program, no program is idle, the int32 row index does not overflow
    assert plan["programs"] * rows_per_program >= n and (plan["programs"] - 1) * rows_per_program < n
    assert plan["programs"] * rows_per_program < 2**31
    assert block_n * consts["LANES"] <= 32 * plan["num_warps"]  # a tile's rows x lanes: the program's threads
    if consts["ONE_PASS"]:
        assert plan["path"] == "one-pass" and chunk >= c  # the row fits in the tile
        assert consts["N_COLS"] == (c if consts["LANES"] == 1 else 0)
    else:
        assert plan["path"].endswith("-sweep") and consts["N_COLS"] == 0
        assert plan["trips"] == [-(-c // chunk)] * plan["read_sweeps"]
        assert not consts["THIRD_SWEEP"] or case["spec"].divergence == 2


def test_launch_plan_invariants_over_random_calls():
    """600 random calls (N up to 2^20, C up to 262144 with the vocabularies of real models,
    fp32 / fp16 / bf16 pairs, (B, T, C) views and sliced rows, unaligned starts, every option, 16 to
    132 SMs): every plan keeps the invariants above."""
    rng = random.Random(20240924)
    paths = {}
    for i in range(600):
        case = random_case(rng)
        plan = P._plan(**case)
        try:
            check_plan(case, plan)
        except AssertionError:
            raise AssertionError(f"case {i}: {case} -> {plan}") from None
        paths[plan["path"]] = paths.get(plan["path"], 0) + 1
    assert set(paths) == {"one-pass", "split-row", "1-sweep", "2-sweep", "3-sweep"}, paths


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_split_path_with_a_meter_at_scale(sms, dtype):
    """Issue 24: 32768 x 128256 fp32 with a meter on 132 SMs gives 4096 rows per group (8 groups of
    63 parts); the split kernel flushes the packed counts every PACK_ROWS rows, so no program's
    counts take more; and the packing itself is exact there (PACK_ROWS (PACK + 1) < 2^24)."""
    assert H.PACK.value == H.PACK_ROWS.value + 1 and H.PACK_ROWS.value * (H.PACK.value + 1) < 2**24
    spec = KDSpec(0.5, 1.0, 0.5, 0, 0.5, -100)
    case = dict(n=32768, c=128256, s_dtype=dtype, t_dtype=dtype, spec=spec, grad_s=True, grad_t=False,
                has_labels=True, meter_s=True, meter_t=False, reduce=True, rows=(1, None, 0, None, 0),
                addresses=(1 << 20, 1 << 21), split_ok=True, sms=sms, fast_math=True)
    plan = P._plan(**case)
    assert plan["path"] == "split-row"
    check_plan(case, plan)
    if sms == 132 and dtype == torch.float32:
        assert plan["ints"]["rows_per_group"] == 4096 and plan["meter_rows"] == H.PACK_ROWS.value


@pytest.mark.parametrize("shape", [(8192, 32000), (4096, 128256), (262144, 16384), (1, 32000), (3000, 9000)],
                         ids=["8192x32000", "4096x128256", "262144x16384", "1x32000", "3000x9000"])
def test_looping_path_with_a_meter_takes_several_rows_per_program(shape):
    """Issue 24: the looping path with a meter shares each program's flush (~50 float64 atomics)
    over several rows while LOOP_METER_PROGRAMS programs remain; within PACK_ROWS rows; without a
    meter one row per program, as before."""
    n, c = shape
    bf16 = torch.bfloat16
    spec = KDSpec(0.5, 1.0, 0.5, 0, 0.5, -100)
    for meter_t in (False, True):
        case = dict(n=n, c=c, s_dtype=bf16, t_dtype=bf16, spec=spec, grad_s=True, grad_t=False, has_labels=True,
                    meter_s=True, meter_t=meter_t, reduce=True, rows=(1, None, 0, None, 0),
                    addresses=(1 << 20, 1 << 21), split_ok=False, sms=132, fast_math=True)
        plan = P._plan(**case)
        check_plan(case, plan)
        assert plan["path"] == "2-sweep"
        per_program = plan["ints"]["blocks_per_program"]
        assert per_program == max(1, min(n // P.LOOP_METER_PROGRAMS, H.PACK_ROWS.value))
        assert plan["programs"] >= min(n, P.LOOP_METER_PROGRAMS)
        if n >= 2 * P.LOOP_METER_PROGRAMS:
            assert per_program > 1
        no_meter = P._plan(**dict(case, meter_s=False, meter_t=False))
        assert no_meter["ints"]["blocks_per_program"] == 1 and no_meter["programs"] == n


# --- the split path's cooperative grid against the compiled kernel (issue 24, item 5) ------------

H100 = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                       max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472)


def test_occupancy_from_registers_threads_and_shared_memory():
    """Blocks per SM: registers by warp in units of 256, threads, shared memory with the driver's 1 KB
    per block, at most 32; times the SMs."""
    assert P._occupancy(168, 0, 4, H100) == 132 * 3  # 5376 registers a warp: 21504 a block
    assert P._occupancy(255, 0, 4, H100) == 132 * 2  # 8192 a warp
    assert P._occupancy(32, 0, 4, H100) == 132 * 16  # by threads: 2048 / 128
    assert P._occupancy(16, 0, 1, H100) == 132 * 32  # the block limit
    assert P._occupancy(64, 100 * 1024, 4, H100) == 132 * 2  # shared memory: 233472 // (101 KB)
    assert P._occupancy(255, 0, 32, H100) == 0  # a block that does not fit at all
    assert P._occupancy(96, 0, 4, SimpleNamespace(multi_processor_count=16)) == 16 * 5  # defaults


class StandInKernel:
    """What _resident_programs reads of a compiled kernel (CompiledKernel's attributes)."""

    def __init__(self, name, n_regs, shared=0):
        self.hash, self._regs, self.metadata = name, n_regs, SimpleNamespace(shared=shared)
        self.n_regs = None

    def _init_handles(self):  # as CompiledKernel: the registers are known once the binary is loaded
        self.n_regs = self._regs


def test_resident_programs_are_those_of_the_compiled_kernel(monkeypatch):
    """The estimate is cached per compiled kernel (Triton compiles one per specialisation of the
    arguments: n_groups or rows_per_group divisible by 16 or equal to 1 give another binary), not per
    constants: two binaries of the same constants with other registers get their own counts."""
    monkeypatch.setattr(L, "_RESIDENT", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H100)
    device = torch.device("cuda", 0)
    light, heavy = StandInKernel("a", 128), StandInKernel("b", 255)
    assert L._resident_programs(device, light, 4) == 132 * 4
    assert L._resident_programs(device, heavy, 4) == 132 * 2
    assert L._resident_programs(device, light, 4) == 132 * 4
    assert L._resident_programs(torch.device("cuda", 1), heavy, 4) == 132 * 2


def test_cooperative_grid_is_sized_by_the_kernel_it_launches():
    """_fitting_groups: fewer groups change the arguments (n_groups, rows_per_group) and so may
    compile to another binary with more registers; the count returned fits the binary compiled for
    that count, not only the first one checked. Here N = 4096 rows, 32 parts a row, 86 SMs: the plan's
    20 groups compile to 168 registers (3 blocks an SM: 8 groups fit), but 8 groups give 512 rows per
    group, divisible by 16, a binary of 255 registers (2 blocks an SM: 5 groups fit); the launch
    takes 5 (sized from the first binary alone, it launched 8 and the driver refused it)."""
    n, parts = 4096, 32
    compiled = []

    def compiled_for(groups):  # the binder's specialisation: rows per group divisible by 16 or not
        kernel = StandInKernel(f"{groups}", 255 if -(-n // groups) % 16 == 0 else 168)
        kernel._init_handles()
        compiled.append(groups)
        return kernel

    def resident_of(kernel):
        return P._occupancy(kernel.n_regs, 0, 4, SimpleNamespace(multi_processor_count=86))

    groups = L._fitting_groups(20, parts, compiled_for, resident_of)  # 205 rows per group: 168 registers
    assert compiled == [20, 8, 5] and groups == 5
    assert groups * parts <= resident_of(compiled_for(groups))
    assert L._fitting_groups(2, parts, compiled_for, resident_of) == 2  # fits at once: one check
    with pytest.raises(L._SplitRefused, match="do not fit") as refused:
        L._fitting_groups(20, 200, compiled_for, resident_of)
    assert not refused.value.by_driver  # the launcher's own check: not a reason to give up the device


def test_tool_hooks_record_every_launch_and_restore_the_plan():
    """The hooks bench/tools use instead of patching attributes (issue 25): under recorded_launches a call
    on CPU tensors launches nothing (outputs stay as allocated) and records the dense kernel and the
    backward's scale; plan_override sets a knob for its block only and refuses a name that is not one;
    backends.override sends a CPU call to the Triton backend."""
    import fastkd
    from fastkd import backends
    from fastkd.backends import triton as T

    with pytest.raises(ValueError, match="not a plan knob: SPLIT_STATICK"):
        with T.plan_override(SPLIT_STATICK=True):
            pass
    assert backends.resolve_name(None, torch.device("cpu"), (torch.float32,)) in ("torch", "triton")
    s = torch.randn(3, 70, requires_grad=True)
    with backends.override("triton"), T.plan_override(SPLIT_STATIC=True), T.recorded_launches() as launches:
        assert P.SPLIT_STATIC is True and backends.resolve_name("torch", s.device, (s.dtype,)) == "triton"
        loss = fastkd.kl_loss(s, torch.randn(3, 70), 2.0)
        torch.autograd.grad(loss, [s])
    assert P.SPLIT_STATIC is False
    assert [launch.kernel.fn.__name__ for launch in launches] == ["_kd_fwd_kernel", "_scale_grad_kernel"]
    assert launches[1].args[0].shape == s.shape  # the gradient the backward scales in place
    assert launches[0].grid == (1,) and launches[0].kwargs["DIVERGENCE"] == 0
