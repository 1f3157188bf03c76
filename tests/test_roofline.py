"""bench/tools/roofline.py, the static sm_90 performance model: it runs without a GPU, its numbers are
consistent with each other, and its dynamic instruction count follows the loops' trip counts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "tools"
sys.path.insert(0, str(BENCH))

import sass_count  # noqa: E402

KEYS = {"backend", "rows", "cols", "dtype", "variant", "path", "registers", "spills", "ctas_per_sm",
        "bytes_in_flight_per_sm", "instr_per_element", "mufu_per_element", "bytes_per_element", "t_memory_us",
        "t_issue_us", "t_mufu_us", "cubin"}
BANDWIDTH, ISSUE_RATE, MUFU_RATE = 4.27e12, 132 * 4 * 1.755e9, 132 * 16 * 1.755e9


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """One DESIGN shape and the same rows twice as long (twice the trips of the looping path), each on
    the split-row path (an H100's) and on the looping path."""
    cubins = tmp_path_factory.mktemp("cubins")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(BENCH / "roofline.py"), "--shape", "8192x32000:bf16",
                           "--shape", "8192x64000:bf16", "--variant", "kl", "--json", "--cubin-dir", str(cubins)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout), cubins


def test_every_row_has_the_keys_and_positive_numbers(model):
    rows, _ = model
    backends = {r["backend"] for r in rows}
    assert "triton" in backends
    # the CUDA C++ kernel was rewritten after roofline.py mirrored its launches: it says so on
    # stderr and models Triton only; bench/tools/cuda_sass_count.py counts the new kernel
    assert backends <= {"triton", "cuda"}
    for r in rows:
        assert KEYS <= r.keys()
        for key in ("registers", "ctas_per_sm", "bytes_in_flight_per_sm", "instr_per_element", "mufu_per_element",
                    "bytes_per_element", "t_memory_us", "t_issue_us", "t_mufu_us"):
            assert r[key] > 0, (r["backend"], key)
        assert r["spills"] >= 0 and r["variant"] == "light:kl"


def test_times_follow_from_counts(model):
    rows, _ = model
    for r in rows:
        elements = r["rows"] * r["cols"]
        assert r["t_memory_us"] == pytest.approx(elements * r["bytes_per_element"] / BANDWIDTH * 1e6)
        assert r["t_issue_us"] == pytest.approx(elements * r["instr_per_element"] / 32 / ISSUE_RATE * 1e6)
        assert r["t_mufu_us"] == pytest.approx(elements * r["mufu_per_element"] / MUFU_RATE * 1e6)
        assert r["predicted_us"] == max(r["t_memory_us"], r["t_issue_us"], r["t_mufu_us"])
        assert r["instr_per_element_min"] <= r["instr_per_element"]


def test_looping_path_counts_grow_with_the_trip_count(model):
    rows, _ = model
    triton = {r["cols"]: r for r in rows if r["backend"] == "triton" and r["path"] != "split-row"}
    short, long = triton[32000], triton[64000]
    assert "loop" in short["path"] and short["bytes_per_element"] == pytest.approx(10, abs=0.01)  # 2 sweeps, bf16
    # twice the columns: twice the loop trips per row, the same per element (straight-line code is small)
    assert 1.8 < long["instr_per_row"] / short["instr_per_row"] < 2.05
    assert long["instr_per_element"] == pytest.approx(short["instr_per_element"], rel=0.05)
    trips = [loop["trips"] for loop in short["kernels"][0]["loops"] if "n_cols" in loop["how"]]
    assert trips == [8, 8]  # ceil(32000 / 4096), one sweep for the statistics and one for the gradient


def test_long_rows_take_the_split_path_an_h100_takes(model):
    """kl_loss with a gradient on long bf16 rows: split over programs that keep their chunk on chip
    (s and t read once, the gradient written once: 6 bytes per element), the wait for the row's other
    parts counted once per row; the same per element at twice the columns (twice the parts)."""
    rows, _ = model
    split = {r["cols"]: r for r in rows if r["backend"] == "triton" and r["path"] == "split-row"}
    assert sorted(split) == [32000, 64000]
    for r in split.values():
        assert r["bytes_per_element"] == pytest.approx(6, abs=0.01)
        loops = r["kernels"][0]["loops"]
        assert [loop["trips"] for loop in loops if "a wait" in loop["how"]] == [1]
        rows_loop = [loop["trips"] for loop in loops if "rows_per_group" in loop["how"]]
        assert len(rows_loop) == 1 and rows_loop[0] * r["kernels"][0]["programs"] >= r["rows"]
    assert split[64000]["instr_per_element"] == pytest.approx(split[32000]["instr_per_element"], rel=0.05)


def test_cubins_are_written_under_their_names(model):
    rows, cubins = model
    for r in rows:
        assert (cubins / r["cubin"]).read_bytes()[:4] == b"\x7fELF"


SASS = """
        .section        .text.k,"ax",@progbits
k:
.text.k:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MOV R2, RZ ;
.L_x_0:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   MUFU.EX2 R8, R4 ;
        /*0040*/                   IADD3 R2, R2, 0x10, RZ ;
        /*0050*/                   ISETP.GE.AND P0, PT, R2, 0x100, PT ;
        /*0060*/              @!P0 BRA `(.L_x_0) ;
        /*0070*/                   LDC R7, c[0x0][0xc] ;
        /*0080*/                   IADD3 R3, R7, -0x1, RZ ;
        /*0090*/                   ISETP.NE.U32.AND P1, PT, R0, R3, PT ;
        /*00a0*/               @P1 EXIT ;
        /*00b0*/                   STG.E desc[UR4][R2.64], R8 ;
        /*00c0*/                   EXIT ;
.L_x_1:
        /*00d0*/                   BRA `(.L_x_1);
"""


def test_sass_counting_on_a_small_kernel():
    fn = sass_count.parse_sass(SASS)["k"]
    count = sass_count.count_kernel(fn, lambda loop, counter: (10.0, "ten"))
    # 2 before the loop, 5 x 10 in it, 4 up to the last-program EXIT; the tail after it, once per launch
    assert count.per_program.instr == 2 + 5 * 10 + 4
    assert count.per_program.mufu == 10
    assert count.tail.instr == 2
    assert [lp.trips for lp in sass_count.all_loops(count.loops)] == [10.0]  # the trap is not a loop
    pending, widths = sass_count.max_pending_load_bytes(fn)
    assert (pending, widths) == (16, [16])


KERNEL_SOURCE = """def k(n):
    for it in range(0, n):
        x = load()
        while seen < it:
            seen = poll()
        store(x)
"""
WAIT_SASS = """
        .section        .text.k,"ax",@progbits
k:
.text.k:
        //## File "{path}", line 1
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MOV R2, RZ ;
.L_x_0:
        //## File "{path}", line 3
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   MUFU.EX2 R8, R4 ;
.L_x_1:
        //## File "{path}", line 5
        /*0040*/                   LDG.E.STRONG.GPU R9, desc[UR4][R2.64] ;
        /*0050*/                   ISETP.GE.AND P1, PT, R9, R2, PT ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        //## File "{path}", line 6
        /*0070*/                   STG.E desc[UR4][R2.64], R8 ;
        //## File "{path}", line 2
        /*0080*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0090*/                   ISETP.GE.AND P0, PT, R2, c[0x0][0x160], PT ;
        /*00a0*/              @!P0 BRA `(.L_x_0) ;
        /*00b0*/                   EXIT ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2);
"""


def test_a_wait_inside_a_loop_runs_once_per_trip(tmp_path):
    """The split kernel's shape: a ``while`` polling for the other programs inside the row loop. The wait
    is one trip per row (uncontended), and the row loop keeps its trip count: a loop nested in another
    of the same Python ``for`` is not an unrolled copy of it (which divided the rows by the loads' ratio)."""
    source = tmp_path / "kernel.py"
    source.write_text(KERNEL_SOURCE)
    fn = sass_count.parse_sass(WAIT_SASS.format(path=source))["k"]
    count = sass_count.count_kernel(fn, sass_count.triton_trip_count({"n": 10}))
    outer, = count.loops
    wait, = outer.children
    assert (outer.trips, wait.trips) == (10, 1)
    assert wait.wait and not outer.wait and "while seen < it" in wait.how
    # 2 before the loop, 10 x (2 + 3 for the wait once + 1 store + 3 for the loop's test), the EXIT
    assert count.per_program.instr == 2 + 10 * 9 + 1
