"""Every code block of README.md runs here, so an example cannot drift from the code.

Blocks are found by their fences and run as a reader on a CPU runs them: in a temporary folder, with
the backend a CPU gets (``TRITON_INTERPRET`` and ``FASTKD_BACKEND`` unset: torch), without the suite's
NaN-filled ``torch.empty``.

- ```python: each block is self-contained (its imports and its own tiny data, as a reader copies it)
  and runs by ``exec`` in a fresh namespace; a traceback names README.md and its line.
- ```yaml: a torchdistill config, loaded and built into a ``DistillationBox`` as torchdistill's
  example scripts do (``load_yaml_file``, ``import_dependencies``, ``get_distillation_box``), then
  one training step on tiny models and data, and the meter read where the README says.
- ```bash: each ``fastkd ...`` command (also ``torchrun ... -m fastkd ...``) is parsed by the CLI's
  own parser and its settings validated as the command would, without running a job; ``pip install``
  names only extras that pyproject.toml defines; the quick start's test command is the one .ci/run
  runs.

An HTML comment on the line before a fence (GitHub does not show it) says how a block runs:

    <!-- gpu -->              needs CUDA: skipped without it
    <!-- needs: <what> -->    needs what the suite does not have (a download): skipped, naming it
    <!-- torchrun: N -->      a script for torchrun: N CPU processes with torchrun's environment
    <!-- folder: tiny-lms --> runs in a folder that holds the Hugging Face causal LMs ``teacher/``
                              and ``student/`` (tiny, random) and ``tokens.npy``; there the bash
                              blocks' fastkd commands are run for real, in README order, before the
                              python blocks (which use what they wrote)

Marks may be combined with ``;``.
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
MARKS = ("gpu", "needs", "torchrun", "folder")
FENCE = re.compile(r"^(?:<!--(?P<marks>[^\n]*)-->\n)?```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # the opening fence's, 1-based
    marks: tuple[tuple[str, str], ...]

    def mark(self, key: str) -> str | None:
        return dict(self.marks).get(key)


def parse_marks(text: str | None) -> tuple[tuple[str, str], ...]:
    marks = []
    for part in (text or "").split(";"):
        key, _, value = part.partition(":")
        if key.strip():
            marks.append((key.strip(), value.strip()))
    return tuple(marks)


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [Block(m["lang"].strip(), m["code"], text.count("\n", 0, m.start("lang")) + 1, parse_marks(m["marks"]))
            for m in FENCE.finditer(text)]


def block_ids(blocks) -> list[str]:
    """Ids from the section a block sits in (``the-loss``), numbered when a section has several."""
    lines = README.read_text().splitlines()
    ids = []
    for b in blocks:
        heading = next((ln.lstrip("#").strip() for ln in reversed(lines[:b.line - 1]) if ln.startswith("#")),
                       "top")
        slug = "-".join(re.findall(r"[a-z0-9]+", heading.lower())[:3]) or "top"
        ids.append(slug if slug not in ids else f"{slug}-{sum(i.startswith(slug) for i in ids) + 1}")
    return ids


BLOCKS = readme_blocks()


def params(lang: str):
    chosen = [b for b in BLOCKS if b.lang == lang]
    return [pytest.param(b, id=i) for b, i in zip(chosen, block_ids(chosen))]


def skip_unless_runnable(block: Block):
    if block.mark("gpu") is not None and not torch.cuda.is_available():
        pytest.skip(f"README.md line {block.line}: a GPU block, no CUDA here")
    if block.mark("needs"):
        pytest.skip(f"README.md line {block.line}: needs {block.mark('needs')}")


# --- the blocks themselves -----------------------------------------------------------------------

def test_every_block_has_a_language_the_suite_runs_and_known_marks():
    assert len(BLOCKS) == README.read_text().count("\n```") // 2, "a fence the pattern does not match"
    for b in BLOCKS:
        # text: a listing to read, not code (the layout tree)
        assert b.lang in ("python", "yaml", "bash", "text"), f"README.md line {b.line}: ```{b.lang} is not run by the suite"
        unknown = [k for k, _ in b.marks if k not in MARKS]
        assert not unknown, f"README.md line {b.line}: unknown mark {unknown} (known: {', '.join(MARKS)})"
    assert [b for b in BLOCKS if b.lang == "python"] and [b for b in BLOCKS if b.lang == "yaml"]


@pytest.fixture
def poison_outputs():
    """Replaces conftest's NaN-filled torch.empty here: the blocks run as in a reader's session."""


@pytest.fixture
def reader(monkeypatch, tmp_path):
    """A reader's CPU session: no Triton interpreter, no forced backend, a folder of its own."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    return tmp_path


def exec_block(block: Block) -> dict:
    # blank lines in front: a traceback names README.md with the README's own line numbers
    code = compile("\n" * block.line + block.code, str(README), "exec")
    namespace = {"__name__": "__main__"}
    exec(code, namespace)
    return namespace


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_as_torchrun(block: Block, world: int, folder: Path):
    """The block as the script torchrun would start ``world`` times: torchrun's environment per rank."""
    script = folder / f"readme_line{block.line}.py"
    script.write_text("\n" * block.line + block.code)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTKD_BACKEND")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=folder, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    failed = [(r, p.returncode, out) for r, (p, out) in enumerate(zip(procs, outputs)) if p.returncode != 0]
    assert not failed, "\n".join(f"rank {r} exited {rc}:\n{out[-3000:]}" for r, rc, out in failed)


@pytest.mark.parametrize("block", params("python"))
def test_python_block_runs(block, reader, request):
    skip_unless_runnable(block)
    folder = block.mark("folder")
    if folder is not None:
        os.chdir(request.getfixturevalue(FOLDERS[folder]))
    if block.mark("torchrun") is not None:
        run_as_torchrun(block, int(block.mark("torchrun")), Path.cwd())
        return
    namespace = exec_block(block)
    loss = namespace.get("loss")
    if isinstance(loss, torch.Tensor):  # the last loss a block computed is a number
        assert torch.isfinite(loss).all(), f"README.md line {block.line}: loss {loss}"


def docstring_yaml() -> Block:
    """The config in fastkd/integrations/torchdistill.py's docstring (the README's, for readers of the code)."""
    text = ast.get_docstring(ast.parse((ROOT / "fastkd" / "integrations" / "torchdistill.py").read_text()))
    indented = text.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    return Block("yaml", textwrap.dedent(indented), 0, ())


@pytest.mark.parametrize("block", [*params("yaml"), pytest.param(docstring_yaml(), id="integration-docstring")])
def test_yaml_block_trains_in_torchdistill(block, reader):
    """The config built into a DistillationBox as torchdistill's scripts build it, and one step."""
    skip_unless_runnable(block)
    pytest.importorskip("torchdistill")
    from torch import nn
    from torchdistill.common.main_util import import_dependencies
    from torchdistill.common.yaml_util import load_yaml_file
    from torchdistill.core.distillation import get_distillation_box

    path = reader / "config.yaml"
    path.write_text(block.code)
    config = load_yaml_file(str(path))
    import_dependencies(config.get("dependencies"))
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    before = [p.detach().clone() for p in student.parameters()]
    box = get_distillation_box(teacher, student, {}, config["train"], torch.device("cpu"), None, False, 1)
    x, y = torch.randn(12, 8), torch.randint(0, 10, (12,))
    box.pre_epoch_process(epoch=0)  # torchdistill's training loop, one step of it
    loss = box.forward_process(x, y)
    box.post_forward_process(loss)
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, q) for p, q in zip(box.student_model.parameters(), before)), "no step taken"
    from fastkd.integrations.torchdistill import FastKDLoss

    criterion = box.criterion.term_dict["kd"][0]  # where the README says the meter is
    assert isinstance(criterion, FastKDLoss)
    if criterion.meter is not None:
        assert criterion.meter.compute().count == len(y)


# --- folders some blocks run in ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory) -> Path:
    """teacher/, student/ (random Llamas, 2 layers / 1 layer, a vocabulary of 128) and tokens.npy
    (6 sequences of 12 tokens); then the README's bash commands marked for this folder, run."""
    pytest.importorskip("transformers")
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-lms")
    torch.manual_seed(0)
    shape = dict(vocab_size=128, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                 max_position_embeddings=64)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, **shape)).save_pretrained(folder / "teacher")
    LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, **shape)).save_pretrained(folder / "student")
    np.save(folder / "tokens.npy", np.random.default_rng(0).integers(0, 128, (6, 12)))
    from fastkd.study.cli import main

    with pytest.MonkeyPatch.context() as mp:  # as the reader fixture: a CPU session, in the folder
        mp.delenv("TRITON_INTERPRET", raising=False)
        mp.delenv("FASTKD_BACKEND", raising=False)
        mp.chdir(folder)
        for block in (b for b in BLOCKS if b.lang == "bash" and b.mark("folder") == "tiny-lms"):
            for args in fastkd_commands(block.code):
                assert main(args) == 0, f"README.md line {block.line}: fastkd {shlex.join(args)}"
    return folder


FOLDERS = {"tiny-lms": "tiny_lms"}


# --- bash -------------------------------------------------------------------------------------------

def commands(code: str) -> list[list[str]]:
    """Each simple command of a shell snippet as its words: continuation lines joined, comments dropped,
    split at ``&&``, ``||``, ``;`` and ``|``; leading ``VAR=value`` assignments dropped."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = []
        for word in [*lexer, ";"]:
            if word in ("&&", "||", ";", "|"):
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words.pop(0)
                if words:
                    found.append(words)
                words = []
            else:
                words.append(word)
    return found


def fastkd_args(words: list[str]) -> list[str] | None:
    """The arguments of a fastkd command (``fastkd ...``, ``python -m fastkd ...``, ``torchrun ... -m
    fastkd ...``), or None for another command."""
    if words[0] == "fastkd":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "fastkd":
            return words[i + 2:]
    return None


def fastkd_commands(code: str) -> list[list[str]]:
    return [a for a in map(fastkd_args, commands(code)) if a is not None]


def check_fastkd_command(args: list[str]):
    """Parsed by the CLI's parser and validated as the command validates before any work."""
    from fastkd.study import cache_teacher, cli
    from fastkd.study.config import StudyConfig

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = cli.build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`fastkd {shlex.join(args)}` does not parse: {stderr.getvalue().strip()}")
    if parsed.command == "cache-teacher":
        cache_teacher.validate(parsed)
    else:
        cli.validate(StudyConfig(**{k: v for k, v in vars(parsed).items() if k not in ("command", "seeds")}))


def extras_defined() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@pytest.mark.parametrize("block", params("bash"))
def test_bash_block_commands_parse(block, monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    checked = 0
    for words in commands(block.code):
        args = fastkd_args(words)
        if args is not None:
            check_fastkd_command(args)
            checked += 1
        elif words[:2] == ["pip", "install"]:
            for spec in words[2:]:
                extras = re.fullmatch(r"(?:fastkd|\.)\[([^\]]*)\]", spec)
                if extras:
                    unknown = set(extras[1].split(",")) - extras_defined()
                    assert not unknown, f"README.md line {block.line}: pip install {spec}: no extra {unknown}"
                    checked += 1
    assert checked, f"README.md line {block.line}: no fastkd or pip install command found to check"


# --- the quick start and CI ------------------------------------------------------------------------

def quick_start() -> list[list[str]]:
    first = next(b for b in BLOCKS if b.lang == "bash")
    return commands(first.code)


def test_quick_start_installs_the_study_then_runs_it_and_the_tests_with_what_they_need():
    cmds = quick_start()
    assert cmds[:2] == [["pip", "install", "-e", ".[study]"], ["fastkd", "distill"]]
    assert ["python", "-m", "pytest"] in cmds


def test_ci_runs_the_readme_test_command_after_a_fresh_install():
    """.ci/run ends with the README's test command (its install and pytest), word for word, after
    making a new virtual environment."""
    readme_lines = [b for b in BLOCKS if b.lang == "bash"][0].code.splitlines()
    (readme_test,) = [ln for ln in readme_lines if "pytest" in ln]
    ci_lines = [ln for ln in CI.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands(ci_lines[-1]) == commands(readme_test), (ci_lines[-1], readme_test)
    assert any("-m venv" in ln for ln in ci_lines[:-1]), "CI installs into a new virtual environment"
    assert os.access(CI, os.X_OK)
