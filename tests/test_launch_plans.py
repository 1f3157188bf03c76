"""The Triton launcher's plans, checked as host arithmetic over many shapes, dtypes, options and SM
counts (no kernel runs): what the interpreter cannot see (DESIGN.md), a compiled launch depends on.
Rows per program within the meters' packed counters, grid and row indices within their integer
types, vector widths dividing C, the strides and the base addresses, tiles covering their rows, the
split path's cooperative grid within what the device holds; and the occupancy arithmetic that sizes
that grid from a compiled kernel, with stand-in kernels and device properties."""
from types import SimpleNamespace

import pytest
import torch

K = pytest.importorskip("fastkd._triton_kd")

# --- the split path's cooperative grid against the compiled kernel (issue 24, item 5) ------------

H100 = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                       max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472)


def test_occupancy_from_registers_threads_and_shared_memory():
    """Blocks per SM: registers by warp in units of 256, threads, shared memory with the driver's 1 KB
    per block, at most 32; times the SMs."""
    assert K._occupancy(168, 0, 4, H100) == 132 * 3  # 5376 registers a warp: 21504 a block
    assert K._occupancy(255, 0, 4, H100) == 132 * 2  # 8192 a warp
    assert K._occupancy(32, 0, 4, H100) == 132 * 16  # by threads: 2048 / 128
    assert K._occupancy(16, 0, 1, H100) == 132 * 32  # the block limit
    assert K._occupancy(64, 100 * 1024, 4, H100) == 132 * 2  # shared memory: 233472 // (101 KB)
    assert K._occupancy(255, 0, 32, H100) == 0  # a block that does not fit at all
    assert K._occupancy(96, 0, 4, SimpleNamespace(multi_processor_count=16)) == 16 * 5  # defaults


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
    monkeypatch.setattr(K, "_RESIDENT", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H100)
    device = torch.device("cuda", 0)
    light, heavy = StandInKernel("a", 128), StandInKernel("b", 255)
    assert K._resident_programs(device, light, 4) == 132 * 4
    assert K._resident_programs(device, heavy, 4) == 132 * 2
    assert K._resident_programs(device, light, 4) == 132 * 4
    assert K._resident_programs(torch.device("cuda", 1), heavy, 4) == 132 * 2


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
        return K._occupancy(kernel.n_regs, 0, 4, SimpleNamespace(multi_processor_count=86))

    groups = K._fitting_groups(20, parts, compiled_for, resident_of)  # 205 rows per group: 168 registers
    assert compiled == [20, 8, 5] and groups == 5
    assert groups * parts <= resident_of(compiled_for(groups))
    assert K._fitting_groups(2, parts, compiled_for, resident_of) == 2  # fits at once: one check
    with pytest.raises(K._SplitRefused, match="do not fit") as refused:
        K._fitting_groups(20, 200, compiled_for, resident_of)
    assert not refused.value.by_driver  # the launcher's own check: not a reason to give up the device
