"""Dynamic instruction counts from SASS text (``nvdisasm -c -g``), without running anything.

A kernel's text is split into basic blocks; loops are found from backward branches (nvcc and
ptxas lay a loop out contiguously, header first, the backward branch last). Each loop is replaced
by one node costing its trip count times one pass through its body, and the cost of the kernel is
then a path through an acyclic graph. Which path? The static text cannot say which way a runtime
branch goes, so the count is a bracket over the *hot* paths:

- cold code is avoided first: targets of ``BRA.DIV`` (the warp-divergent fallback of a shuffle),
  calls to the compiler's internal helpers (``$__internal_*``: slow paths of division and
  reciprocal for denormals or 64-bit operands);
- a loop given a trip count >= 1 is entered (a path that jumps over it contradicts the count);
  a Triton ``while`` (a wait for other programs: the split kernel's) runs once each time it is
  reached (one poll, as when the other programs arrived first: its instructions count once);
- among the remaining paths, ``longest`` (an upper bound, the reported number) and ``shortest``.

A predicated EXIT whose predicate is computed from the grid size (``c[0x0][0xc]``: the "last
program" test of a ticket reduction) ends the path of all programs but one: the code after it is
counted once per launch (``tail``), not once per program.
"""
from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
LINE_RE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
LABEL_RE = re.compile(r"^(\S+):\s*$")
SECTION_RE = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
TARGET_RE = re.compile(r"`\(([^)]+)\)")
REG_RE = re.compile(r"\bR(\d+)(\.64|\.128)?\b")
GRID_SIZE = "c[0x0][0xc]"  # nctaid.x in the constant bank: Triton's tl.num_programs(0)
STORE_OPS = ("ST", "STG", "STS", "STL", "RED", "REDG")  # no destination register


@dataclass
class Instr:
    addr: int
    guard: str  # "", "@P0", "@!P0", ...
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str
    line: Optional[tuple[str, int]]  # (source file, line) from the line info

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def target(self) -> Optional[str]:
        found = TARGET_RE.findall(self.operands)
        return found[-1] if found else None


@dataclass
class Function:
    """One kernel's text section: its instructions and the address of every label in it."""
    name: str
    instrs: list[Instr]
    labels: dict[str, int]  # label -> index of the instruction it names


def parse_sass(text: str) -> dict[str, Function]:
    """Every code section of ``nvdisasm -c [-g]`` output, by kernel name."""
    functions: dict[str, Function] = {}
    current: Optional[Function] = None
    line = None
    pending_labels: list[str] = []
    for raw in text.splitlines():
        if m := SECTION_RE.match(raw):
            current = functions.setdefault(m.group(1), Function(m.group(1), [], {}))
            line, pending_labels = None, []
        elif current is None:
            continue
        elif m := LINE_RE.match(raw):
            line = (m.group(1), int(m.group(2)))
        elif m := INSTR_RE.match(raw):
            for label in pending_labels:
                current.labels[label] = len(current.instrs)
            pending_labels = []
            guard = (m.group(2) or "").strip()
            current.instrs.append(Instr(int(m.group(1), 16), guard, m.group(3), m.group(4), line))
        elif m := LABEL_RE.match(raw.strip()):
            pending_labels.append(m.group(1))
    return functions


# ---------------------------------------------------------------------------------------------
# what an instruction is


def access_bytes(ins: Instr) -> int:
    """Bytes one thread moves with a load or store (vector width from the opcode's modifiers)."""
    mods = ins.opcode.split(".")[1:]
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def is_global_load(ins: Instr) -> bool:
    return ins.op in ("LDG", "LD")


def is_global_store(ins: Instr) -> bool:
    return ins.op in ("STG", "ST")


def is_spin(ins: Instr) -> bool:
    """A compare-and-swap retry (e.g. fp64 atomicAdd on shared memory)."""
    return "CAS" in ins.opcode or "SPIN" in ins.opcode


def registers(text: str) -> set[int]:
    regs = set()
    for num, width in REG_RE.findall(text):
        n = int(num)
        regs.update(range(n, n + {"": 1, ".64": 2, ".128": 4}[width]))
    return regs


def destination_and_sources(ins: Instr) -> tuple[set[int], set[int]]:
    """General registers an instruction writes and reads (first operand = destination, except for
    stores and atomics without a result)."""
    parts = [p.strip() for p in ins.operands.split(",")]
    if not parts or ins.op in STORE_OPS:
        return set(), registers(ins.operands)
    return registers(parts[0]), registers(",".join(parts[1:]))


def category(ins: Instr) -> str:
    """A coarse class for the instruction mix: where the issue slots go."""
    op = ins.op
    if op == "MUFU":
        return "mufu"
    if op in ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK", "FSET", "FRND", "FABS"):
        return "fp32"
    if op in ("HADD2", "HMUL2", "HFMA2", "HSETP2", "HMNMX2", "DADD", "DMUL", "DFMA", "DSETP"):
        return "fp16/fp64" if not ins.opcode.startswith("HFMA2.MMA") else "move"
    if op in ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP"):
        return "convert"
    if op in ("MOV", "UMOV", "CS2R", "S2R", "S2UR", "LDC", "ULDC", "SEL", "USEL", "PRMT", "UPRMT"):
        return "move"
    if op in ("SHFL",):
        return "shuffle"
    if op in ("LDG", "LD", "STG", "ST"):
        return "global ld/st"
    if op in ("LDS", "STS", "LDSM", "ATOMS"):
        return "shared ld/st"
    if op in ("BAR", "MEMBAR", "ERRBAR", "CGAERRBAR", "CCTL", "FENCE"):
        return "barrier/fence"
    if op in ("ATOM", "ATOMG", "RED", "REDG"):
        return "global atomic"
    if op in ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "WARPSYNC", "NOP", "VOTE", "VOTEU",
              "PLOP3", "BREAK", "BMOV", "YIELD"):
        return "control/predicate"
    if op.startswith("I") or op.startswith("U") or op in ("LOP3", "SHF", "LEA", "SGXT", "POPC", "FLO",
                                                          "BMSK", "VIADD", "VIMNMX", "BREV"):
        return "integer/address"
    return "other"


# ---------------------------------------------------------------------------------------------
# control flow


@dataclass
class Block:
    start: int  # index of its first instruction
    end: int  # index past its last
    succs: list = field(default_factory=list)  # (block index or END, cold edge?)
    ends_launch_path: bool = False  # a predicated EXIT computed from the grid size ends here


END = -1  # the virtual node every path finishes at


@dataclass
class Loop:
    header: int  # block index
    latch: int  # block index of the backward branch (the last block of the loop)
    trips: float = 1.0
    how: str = ""  # how the trip count was found
    source: object = None  # the source loop it was compiled from (copies share it), when known
    children: list = field(default_factory=list)
    wait: bool = False  # polls memory until other programs arrive: no traffic, one trip per entry

    def contains(self, other: "Loop") -> bool:
        return self.header <= other.header and other.latch <= self.latch and self is not other


def is_unconditional(ins: Instr) -> bool:
    return not ins.guard and "DIV" not in ins.opcode and "P" not in ins.operands.split("`")[0]


def reads_grid_size(instrs: list[Instr], at: int, window: int = 64) -> bool:
    """Whether the guard predicate of ``instrs[at]`` is computed (within ``window`` instructions
    before it) from the number of programs: a backward slice over registers and predicates."""
    wanted = {instrs[at].guard.lstrip("@!")}
    for ins in reversed(instrs[max(0, at - window):at]):
        parts = [p.strip() for p in ins.operands.split(",")]
        n_dest = 0
        while n_dest < len(parts) and re.fullmatch(r"U?P[T\d]+", parts[n_dest]):
            n_dest += 1  # leading predicate destinations (ISETP P0, PT, ...)
        dests, srcs = parts[:max(n_dest, 1)], parts[max(n_dest, 1):]
        hit = [d for d in dests if d in wanted]
        if not hit:
            continue
        wanted.difference_update(hit)
        if GRID_SIZE in ins.operands:
            return True
        for src in srcs:
            wanted.update(re.findall(r"\bU?R\d+\b|\bU?P\d\b", src))
    return False


def build_blocks(fn: Function) -> list[Block]:
    instrs = fn.instrs
    leaders = {0}
    for i, ins in enumerate(instrs):
        target = ins.target
        if ins.op == "BRA" and target in fn.labels:
            leaders.add(fn.labels[target])
        if ins.op in ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX", "BPT"):
            leaders.add(i + 1)
    leaders.update(fn.labels.values())
    starts = sorted(x for x in leaders if x < len(instrs))
    blocks = [Block(s, e) for s, e in zip(starts, starts[1:] + [len(instrs)])]
    block_at = {b.start: k for k, b in enumerate(blocks)}
    for k, b in enumerate(blocks):
        last = instrs[b.end - 1]
        fallthrough = (k + 1, False) if k + 1 < len(blocks) else (END, False)
        if last.op == "BRA" and last.target in fn.labels:
            taken = (block_at[fn.labels[last.target]], "DIV" in last.opcode)
            b.succs = [taken] if is_unconditional(last) else [taken, fallthrough]
        elif last.op in ("EXIT", "RET"):
            if not last.guard:
                b.succs = [(END, False)]
            elif last.op == "EXIT" and reads_grid_size(instrs, b.end - 1):
                b.succs, b.ends_launch_path = [(END, False)], True
            else:
                b.succs = [(END, False), fallthrough]
        elif last.op in ("BRX", "JMP", "JMX", "BPT"):
            b.succs = [(END, False)]  # indirect jumps and traps: not followed
        else:
            b.succs = [fallthrough]
    return blocks


def find_loops(blocks: list[Block], instrs: list[Instr], sources: Optional[set] = None) -> list[Loop]:
    """Natural loops from backward edges (from ``sources`` blocks only, when given), one per header
    (the furthest latch), as a forest."""
    latch_of: dict[int, int] = {}
    for k, b in enumerate(blocks):
        if sources is not None and k not in sources:
            continue
        for s, _ in b.succs:
            if s != END and blocks[s].start <= b.start:
                latch_of[s] = max(latch_of.get(s, k), k)
    loops = sorted((Loop(h, l) for h, l in latch_of.items()), key=lambda lp: (lp.header, -lp.latch))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for lp in loops:
        while stack and not stack[-1].contains(lp):
            stack.pop()
        (stack[-1].children if stack else roots).append(lp)
        stack.append(lp)
    return roots


def reachable_blocks(fn: Function, blocks: list[Block], hot_only: bool = False) -> set[int]:
    """Blocks reachable from the entry, following branches and calls (not the trap at the end);
    ``hot_only``: not through cold edges nor into the compiler's internal helpers."""
    start_of = {b.start: k for k, b in enumerate(blocks)}
    seen, todo = set(), [0]
    while todo:
        k = todo.pop()
        if k in seen or k == END:
            continue
        seen.add(k)
        todo.extend(s for s, cold in blocks[k].succs if not (hot_only and cold))
        for ins in fn.instrs[blocks[k].start:blocks[k].end]:
            if ins.op == "CALL" and ins.target in fn.labels and not (hot_only and is_internal(ins.target)):
                todo.append(start_of[fn.labels[ins.target]])
    return seen


def is_internal(label: str) -> bool:
    """nvcc's out-of-line helpers: slow paths of division, reciprocal, 64-bit integer division."""
    return label.startswith("$__internal")


def prune_unreachable(roots: list[Loop], reachable: set[int]) -> list[Loop]:
    kept = [lp for lp in roots if lp.header in reachable]
    for lp in kept:
        lp.children = prune_unreachable(lp.children, reachable)
    return kept


def all_loops(roots: list[Loop]):
    for lp in roots:
        yield lp
        yield from all_loops(lp.children)


# ---------------------------------------------------------------------------------------------
# costs along a path


@dataclass
class Cost:
    instr: float = 0.0
    cold: float = 0.0
    mix: Counter = field(default_factory=Counter)  # category -> instructions
    opcodes: Counter = field(default_factory=Counter)  # base opcode -> instructions
    lines: Counter = field(default_factory=Counter)  # (source file, line) -> instructions

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.instr + o.instr, self.cold + o.cold, self.mix + o.mix, self.opcodes + o.opcodes,
                    self.lines + o.lines)

    def scaled(self, k: float) -> "Cost":
        def times(counter):
            return Counter({a: v * k for a, v in counter.items()})
        return Cost(self.instr * k, self.cold * k, times(self.mix), times(self.opcodes), times(self.lines))

    @property
    def mufu(self) -> float:
        return self.mix.get("mufu", 0.0)


PREFER = {
    "longest": lambda c: (-c.cold, c.instr),
    "shortest": lambda c: (-c.cold, -c.instr),
}


@dataclass
class KernelCount:
    """Per-warp dynamic cost of one program (CTA), and of the once-per-launch tail."""
    per_program: Cost
    tail: Cost  # runs in one program per launch (after a grid-size EXIT)
    loops: list[Loop]
    warnings: list[str]


class PathCounter:
    """Walks one function's CFG; ``trip_count(loop, analysis)`` gives each loop's trips."""

    def __init__(self, fn: Function, trip_count: Callable, choose: str):
        self.fn, self.instrs = fn, fn.instrs
        self.blocks = build_blocks(fn)
        # out-of-line cold code (a BRA.DIV fallback) jumps back into a loop: that is not a loop
        hot = reachable_blocks(fn, self.blocks, hot_only=True)
        self.loops = prune_unreachable(find_loops(self.blocks, self.instrs, hot), hot)
        self.prefer = PREFER[choose]
        self.warnings: list[str] = []
        for lp in all_loops(self.loops):
            lp.trips, lp.how = trip_count(lp, self)

    # -- pieces -------------------------------------------------------------------------------
    def block_instrs(self, k: int) -> list[Instr]:
        b = self.blocks[k]
        return self.instrs[b.start:b.end]

    def loop_instrs(self, lp: Loop) -> list[Instr]:
        return self.instrs[self.blocks[lp.header].start:self.blocks[lp.latch].end]

    @functools.lru_cache(maxsize=None)
    def call_cost(self, label: str) -> Cost:
        if is_internal(label) or label not in self.fn.labels:
            cold = Cost(cold=1.0)  # compiler-internal slow path (or an unknown callee)
            if label in self.fn.labels:
                cold = cold + self.path(self.block_index(self.fn.labels[label]), None)
            return cold
        return self.path(self.block_index(self.fn.labels[label]), None)

    def block_index(self, instr_index: int) -> int:
        return next(k for k, b in enumerate(self.blocks) if b.start == instr_index)

    def block_cost(self, k: int) -> Cost:
        c = Cost()
        for ins in self.block_instrs(k):
            c.instr += 1
            c.mix[category(ins)] += 1
            c.opcodes[ins.op] += 1
            c.lines[ins.line] += 1
            if ins.op == "CALL" and ins.target:
                c = c + self.call_cost(ins.target)
        return c

    # -- paths ----------------------------------------------------------------------------------
    def region(self, lo: int, hi: int, loops: list[Loop]):
        """Nodes of blocks lo..hi with the given (top-level in this range) loops collapsed:
        node id = first block index; returns {block -> node id}."""
        node_of = {k: k for k in range(lo, hi + 1)}
        for lp in loops:
            for k in range(lp.header, lp.latch + 1):
                node_of[k] = lp.header
        return node_of

    def path(self, entry: int, enclosing: Optional[Loop]) -> Cost:
        """Preferred cost from block ``entry`` to the end of ``enclosing``'s latch (a loop body)
        or to END (a function)."""
        if enclosing is not None:
            lo, hi, loops = enclosing.header, enclosing.latch, enclosing.children
        else:
            lo, hi = entry, self.function_end(entry)
            loops = [lp for lp in self.loops if lo <= lp.header <= hi]
        node_of = self.region(lo, hi, loops)
        loop_at = {lp.header: lp for lp in loops}
        best: dict[int, Cost] = {entry: Cost()}
        result: Optional[Cost] = None

        def offer(node, cost):
            nonlocal result
            if node == "out":
                if result is None or self.prefer(cost) > self.prefer(result):
                    result = cost
            elif node not in best or self.prefer(cost) > self.prefer(best[node]):
                best[node] = cost

        for k in sorted(set(node_of.values())):
            if k not in best:
                continue
            here = best[k]
            if k in loop_at:
                lp = loop_at[k]
                out = here + self.path(lp.header, lp).scaled(lp.trips)
                exits = [(s, cold) for j in range(lp.header, lp.latch + 1) for s, cold in self.blocks[j].succs
                         if s == END or not lp.header <= s <= lp.latch]
                last = lp.latch
            else:
                out = here + self.block_cost(k)
                exits, last = self.blocks[k].succs, k
            if enclosing is not None and last == hi:
                offer("out", out)  # one trip through the body ends at the backward branch
                continue
            for s, cold in self.usable_edges(k, exits, loops):
                edge = out + Cost(cold=1.0) if cold else out
                if s == END or not lo <= s <= hi:
                    if enclosing is None:  # a loop body is measured header to latch only
                        offer("out", edge)
                elif node_of[s] > k:
                    offer(node_of[s], edge)
        if result is None:
            self.warnings.append(f"no path out of block {entry}")
            return Cost()
        return result

    def usable_edges(self, k: int, edges, loops: list[Loop]):
        """Edges that do not jump over a loop that is given >= 1 trip (when there is a choice),
        unless they lead to another copy of the same source loop (a versioned loop)."""
        def skips_a_loop(s):
            target = float("inf") if s == END else s
            later = {lp.source for lp in loops if lp.header >= target and lp.source is not None}
            return any(k < lp.header and lp.latch < target and lp.trips >= 1 and
                       (lp.source is None or lp.source not in later) for lp in loops)
        kept = [(s, c) for s, c in edges if not skips_a_loop(s)]
        return kept or list(edges)

    def function_end(self, entry: int) -> int:
        """Last block of the function starting at ``entry``: up to the next function label."""
        starts = sorted(self.block_index(i) for name, i in self.fn.labels.items()
                        if name.startswith("$") and not name.startswith("$L"))
        later = [s for s in starts if s > entry]
        return (later[0] - 1) if later else len(self.blocks) - 1

    # -- the kernel -----------------------------------------------------------------------------
    def count(self) -> KernelCount:
        per_program = self.path(0, None)
        tail = Cost()
        for k, b in enumerate(self.blocks):
            if b.ends_launch_path and k + 1 < len(self.blocks):
                tail = self.path(k + 1, None)  # the last program goes on
        return KernelCount(per_program, tail, self.loops, self.warnings)


def count_kernel(fn: Function, trip_count: Callable, choose: str = "longest") -> KernelCount:
    return PathCounter(fn, trip_count, choose).count()


# ---------------------------------------------------------------------------------------------
# loads in flight


def max_pending_load_bytes(fn: Function, spans: Optional[list[tuple[int, int]]] = None) -> tuple[int, list[int]]:
    """Most bytes of global loads one thread has issued and not yet consumed, at any point of the
    kernel's text in address order (reset at loop boundaries), and the load widths seen (bytes).
    A load is consumed when an instruction reads one of its destination registers. ``spans``
    (instruction index ranges, e.g. the loops that carry the traffic) limit where it looks."""
    blocks = build_blocks(fn)
    loop_headers = {blocks[lp.header].start for lp in all_loops(find_loops(blocks, fn.instrs))}
    subroutines = [i for name, i in fn.labels.items() if name.startswith("$")]
    main_end = min(subroutines, default=len(fn.instrs))
    spans = spans or [(0, main_end)]
    pending: dict[int, tuple[int, frozenset]] = {}  # load index -> (bytes, its registers)
    best, widths = 0, set()
    for i, ins in enumerate(fn.instrs[:main_end]):
        if not any(lo <= i < hi for lo, hi in spans):
            pending.clear()
            continue
        if i in loop_headers or (ins.op == "BRA" and ins.target in fn.labels and fn.labels[ins.target] <= i):
            pending.clear()
        if ins.op in ("EXIT", "RET", "CALL") and not ins.guard:
            pending.clear()
        dests, srcs = destination_and_sources(ins)
        for j in [j for j, (_, regs) in pending.items() if regs & srcs]:
            del pending[j]
        if is_global_load(ins):
            size = access_bytes(ins)
            widths.add(size)
            pending[i] = (size, frozenset(dests))
            best = max(best, sum(b for b, _ in pending.values()))
    return best, sorted(widths)


# ---------------------------------------------------------------------------------------------
# Triton loops: the trip count of the Python ``for`` a SASS loop came from


CHECKOUT = Path(__file__).resolve().parents[2]


def this_checkout(path: str) -> Path:
    """A kernel source named by a cubin's line info, in this checkout: Triton's cache is keyed by the
    source's content, so a cached cubin may name the same file in another (even deleted) checkout."""
    parts = Path(path).parts
    if "fastkd" in parts:
        local = CHECKOUT.joinpath(*parts[len(parts) - 1 - parts[::-1].index("fastkd"):])
        if local.is_file():
            return local
    return Path(path)


@functools.lru_cache(maxsize=None)
def python_loops(path: str) -> list[ast.For | ast.While]:
    try:
        tree = ast.parse(this_checkout(path).read_text())
    except (OSError, SyntaxError):
        return []
    return [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))]


def source_for_loop(instrs: list[Instr]) -> Optional[ast.For | ast.While]:
    """The Python ``for`` (or ``while``) whose span holds most of the loop's instructions (ties: the
    innermost). Triton's own library code (reductions inlined into the loop) is not a candidate."""
    lines = Counter(ins.line for ins in instrs if ins.line and "/triton/language/" not in ins.line[0])
    best, best_key = None, None
    for path in {p for p, _ in lines}:
        for loop in python_loops(path):
            inside = sum(n for (p, ln), n in lines.items() if p == path and loop.lineno <= ln <= loop.end_lineno)
            key = (inside, -(loop.end_lineno - loop.lineno))
            if inside and (best_key is None or key > best_key):
                best, best_key = loop, key
    return best


def evaluate(node: ast.AST, names: dict) -> float:
    """An integer expression of kernel arguments (names, constants, + - * // and unary -)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name) and isinstance(names.get(node.id), (int, float)):
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -evaluate(node.operand, names)
    if isinstance(node, ast.BinOp):
        a, b = evaluate(node.left, names), evaluate(node.right, names)
        ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
        if type(node.op) in ops:
            return ops[type(node.op)]
        if isinstance(node.op, ast.FloorDiv):
            return a // b
    raise ValueError(ast.dump(node))


def range_trips(loop: ast.For, names: dict) -> int:
    """len(range(...)) of a ``for x in range(...)`` / ``tl.range(...)`` over kernel arguments."""
    call = loop.iter
    func = call.func.attr if isinstance(getattr(call, "func", None), ast.Attribute) else \
        getattr(getattr(call, "func", None), "id", "")
    if not isinstance(call, ast.Call) or func not in ("range", "static_range"):
        raise ValueError("not a range loop")
    args = [evaluate(a, names) for a in call.args[:3]]
    return len(range(*[int(a) for a in args]))


def unroll_share(lp: Loop, counter: PathCounter, key: Callable, trips: float, how: str) -> tuple[float, str]:
    """Loops compiled from one source loop (same ``key``): nvcc unrolls a grid-stride loop U times
    and adds a remainder loop (and may version it). U = the ratio of a copy's global stores (loads
    when some copy stores nothing) to the smallest copy's; an unrolled copy runs trips / U times,
    a remainder (U_max - 1) / 2 times on average; plain versions keep the trips (one of them runs)."""
    mine = key(lp)
    # copies sit side by side; a loop nested in another of the same source loop (a ``while`` inside
    # it, say) is not a copy of it
    group = [o for o in all_loops(counter.loops) if mine is not None and key(o) == mine
             and (o is lp or not (o.contains(lp) or lp.contains(o)))]
    if len(group) < 2:
        return trips, how

    def stores(o):
        return sum(1 for i in counter.loop_instrs(o) if is_global_store(i))

    def loads(o):
        return sum(1 for i in counter.loop_instrs(o) if is_global_load(i))

    weight = stores if all(stores(o) for o in group) else loads
    unit = min(weight(o) for o in group) or 1
    factor = {id(o): max(1, round(weight(o) / unit)) for o in group}
    u, u_max = factor[id(lp)], max(factor.values())
    if u > 1:
        return trips / u, f"{how}, unrolled x{u}: {trips / u:g}"
    if u_max > 1:
        rest = min(trips, (u_max - 1) / 2)
        return rest, f"{how}, remainder of an x{u_max} unroll: {rest:g}"
    return trips, how


def triton_trip_count(names: dict) -> Callable:
    """Trip counts for a Triton kernel's SASS loops, from the Python source and the arguments."""
    def key(lp: Loop, counter: PathCounter):
        node = source_for_loop(counter.loop_instrs(lp))
        return None if node is None else (node.lineno, node.col_offset)

    def trip_count(lp: Loop, counter: PathCounter) -> tuple[float, str]:
        instrs = counter.loop_instrs(lp)
        if any(is_spin(i) for i in instrs) and not any(is_global_load(i) for i in instrs):
            return 1.0, "retry loop (1 trip: uncontended)"
        node = source_for_loop(instrs)
        if node is None:
            return 1.0, "unknown (no line info): 1 trip"
        if isinstance(node, ast.While):  # a wait (the split kernel's for the other parts of its row)
            lp.wait = True
            return 1.0, f"line {node.lineno}: while {ast.unparse(node.test)}: a wait, 1 trip per entry (uncontended)"
        try:
            trips = range_trips(node, names)
        except (ValueError, TypeError, ZeroDivisionError):
            return 1.0, f"unknown (line {node.lineno}: {ast.unparse(node.iter)} not of kernel arguments): 1 trip"
        how = f"line {node.lineno}: {ast.unparse(node.iter)} = {trips}"
        lp.source = key(lp, counter)
        return unroll_share(lp, counter, lambda o: key(o, counter), float(trips), how)
    return trip_count


# ---------------------------------------------------------------------------------------------
# CUDA C++ loops: a ``for`` over constants is evaluated, the others get a trip count by shape

C_FOR_RE = re.compile(r"\bfor\s*\(\s*(?:[\w:]+\s+)?(\w+)\s*=\s*([^;]+);\s*(\w+)\s*(<=|<|>=|>|!=)\s*([^;]+);"
                      r"\s*([^)]*)\)")
C_CONSTANT_RE = re.compile(r"\bconstexpr\s+[\w:]+\s+(\w+)\s*=\s*([^;]+);")


@functools.lru_cache(maxsize=None)
def source_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


@functools.lru_cache(maxsize=None)
def c_constants(path: str) -> dict:
    """``constexpr int kName = <expr>;`` of a source file, evaluated in order."""
    names: dict = {}
    for line in source_lines(path):
        if m := C_CONSTANT_RE.search(line):
            try:
                names[m.group(1)] = c_value(m.group(2), names)
            except ValueError:
                pass
    return names


def c_value(text: str, names: dict) -> int:
    text = re.sub(r"(?<=\d)[uUlL]+\b", "", text.strip()).replace("/", "//")
    if not re.fullmatch(r"[\w\s+\-*/()<>]+", text):
        raise ValueError(text)
    try:
        return int(eval(text, {"__builtins__": {}}, dict(names)))  # names and integer arithmetic only
    except Exception as e:
        raise ValueError(text) from e


def c_for_trips(statement: str, names: dict) -> int:
    """Trips of ``for (int v = a; v OP b; update)`` when a and b are constants."""
    m = C_FOR_RE.search(re.sub(r"static_cast<[\w:]+>\(([^()]*)\)", r"\1", statement))
    if not m or m.group(1) != m.group(3):
        raise ValueError(statement)
    var, start, op, bound, update = m.group(1), m.group(2), m.group(4), m.group(5), m.group(6).strip()
    v, end = c_value(start, names), c_value(bound, names)
    step = re.fullmatch(rf"(?:\+\+{var}|{var}\+\+|--{var}|{var}--|{var}\s*(\+=|-=|\*=|>>=|<<=|/=)\s*(.+))", update)
    if not step:
        raise ValueError(update)
    amount = c_value(step.group(2), names) if step.group(1) else 1
    advance = {"+=": lambda x: x + amount, "-=": lambda x: x - amount, "*=": lambda x: x * amount,
               ">>=": lambda x: x >> amount, "<<=": lambda x: x << amount, "/=": lambda x: int(x / amount),
               None: (lambda x: x + 1) if "++" in update else (lambda x: x - 1)}[step.group(1)]
    compare = {"<": int.__lt__, "<=": int.__le__, ">": int.__gt__, ">=": int.__ge__, "!=": int.__ne__}[op]
    trips = 0
    while compare(v, end) and trips < 1 << 20:
        v, trips = advance(v), trips + 1
    return trips


def c_loop_source(lp: Loop, counter: PathCounter) -> Optional[tuple[str, int]]:
    """The source line of the ``for`` a SASS loop comes from: the loop's increment and test sit
    just before its backward branch, so the first ``for`` line met walking back from it."""
    for ins in reversed(counter.loop_instrs(lp)[-12:]):
        if ins.line and re.search(r"\bfor\s*\(", c_line(*ins.line)):
            return ins.line
    return None


def c_line(path: str, line: int) -> str:
    lines = source_lines(path)
    return lines[line - 1] if 0 < line <= len(lines) else ""


def c_statement(path: str, line: int) -> str:
    """A ``for (...)`` header, joined over the lines it spans."""
    lines, text = source_lines(path), ""
    for k in range(line - 1, min(line + 4, len(lines))):
        text += " " + lines[k].strip()
        if text.count("(") and text.count("(") <= text.count(")"):
            break
    return text.strip()


def shape_rule_trip_count(column_trips: float, row_trips: float) -> Callable:
    """Trip counts for CUDA C++ loops: a ``for`` over constants (a shuffle ladder) is evaluated;
    otherwise by shape: a loop that loads from global memory and holds no other loop sweeps
    columns (``column_trips``); a loop holding loops walks rows (``row_trips``); the rest
    (shared-memory init/flush, CAS retries) runs once. Unrolled copies share the trips."""
    def trip_count(lp: Loop, counter: PathCounter) -> tuple[float, str]:
        instrs = counter.loop_instrs(lp)
        if any(is_spin(i) for i in instrs) and not any(is_global_load(i) for i in instrs):
            return 1.0, "retry loop (1 trip: uncontended)"
        source = lp.source = c_loop_source(lp, counter)
        if source is not None:
            statement = c_statement(*source)
            try:
                trips = c_for_trips(statement, c_constants(source[0]))
                return float(trips), f"line {source[1]}: {statement.strip()[:60]} = {trips}"
            except ValueError:
                pass
        if lp.children:
            trips, how = row_trips, f"outer loop: {row_trips:g} trips (rows per thread group)"
        elif any(is_global_load(i) for i in instrs):
            trips, how = column_trips, f"load loop: {column_trips:g} trips"
        else:
            return 1.0, "no global load: 1 trip"
        return unroll_share(lp, counter, lambda o: c_loop_source(o, counter), trips, how)
    return trip_count
