"""What a user installs. The sdist and the wheel are built from this checkout as `python -m build`
builds them (the wheel from the unpacked sdist), and the wheel is installed into a fresh virtual
environment outside the source tree that holds fastkd's core dependencies and nothing else.

That environment is made without downloading anything: the distributions that the wheel's core
requirements pull in (read from its metadata, followed transitively through the metadata of what
this interpreter has installed) are linked into the new site-packages, and pip then installs the
wheel against them with no index, so an unmet requirement fails here. The study's packages are
absent there for real, not hidden.
"""
from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fastkd

ROOT = Path(__file__).resolve().parent.parent
STUDY_MODULES = ("sklearn", "scipy", "tqdm", "matplotlib", "tensorboard", "torchvision")
STUDY_DISTRIBUTIONS = {"scikit-learn", "scipy", "tqdm", "matplotlib", "tensorboard", "torchvision", "tokenizers"}
HAS_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
CXX_SUFFIXES = (".cu", ".cuh", ".cpp", ".h", ".hpp")  # what pyproject ships from kernels/


def cxx_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix in CXX_SUFFIXES}


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def clean_env(**extra) -> dict:
    """This process's environment without what would let the checkout leak into the venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET", "FASTKD_BUILD_CUDA",
            "FASTKD_BACKEND"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


# --- building ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel) of this checkout; a plain wheel (the extension is compiled once, below)."""
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend of this environment, offline; build still checks that it
    # satisfies [build-system] requires
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], env=clean_env())
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return sdist, wheel


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def core_requirements(meta) -> list[Requirement]:
    """The wheel's requirements that no extra asks for and that apply on this platform."""
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_wheel_and_sdist_carry_the_kernels_and_every_module(dists):
    sdist, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    with tarfile.open(sdist) as tf:
        top = tf.getnames()[0].split("/")[0]
        in_sdist = {n.partition("/")[2] for n in tf.getnames()}
    kernels = cxx_files(ROOT / "kernels")
    assert kernels and {f"fastkd/kernels/{k}" for k in kernels} <= in_wheel
    assert {f"kernels/{k}" for k in kernels} <= in_sdist, f"{top} lacks kernels/"
    # pyproject lists the packages by hand (kernels/ is mapped in): a new subpackage must be added
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastkd").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= in_wheel, f"not in the wheel: {sorted(modules - in_wheel)}"
    assert {"fastkd/py.typed", "fastkd/backends/triton/triton_configs.json"} <= in_wheel
    assert {"LICENSE", "CHANGELOG.md", "setup.py", "tests/conftest.py"} <= in_sdist


def test_wheel_metadata_lean_core_and_release_fields(dists):
    meta = wheel_metadata(dists[1])
    assert meta["Version"] == fastkd.__version__
    core = {canonicalize_name(r.name): r for r in core_requirements(meta)}
    assert set(core) == {"torch", "numpy"} | ({"triton"} if platform.system() == "Linux" else set())
    assert all(s.operator == ">=" for r in core.values() for s in r.specifier), "floors only, no caps"
    study = {canonicalize_name(Requirement(r).name) for r in meta.get_all("Requires-Dist")
             if 'extra == "study"' in r}
    assert study == STUDY_DISTRIBUTIONS
    assert {"study", "test", "all"} <= set(meta.get_all("Provides-Extra"))
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_all("Project-URL") and meta.get_all("Classifier")


# --- the core-only environment ------------------------------------------------------------------

def distributions_needed(requirements) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``requirements`` pull in, transitively, with markers
    (extras included) evaluated for this interpreter."""
    found, seen = {}, set()
    todo = [(r, "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        key = (canonicalize_name(req.name), extra, frozenset(req.extras))
        if key in seen or (req.marker is not None and not req.marker.evaluate({"extra": extra})):
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        found[key[0]] = dist
        todo += [(Requirement(r), e) for r in dist.requires or () for e in ("", *req.extras)]
    return found


def link_distributions(site: Path, dists: dict[str, metadata.Distribution]):
    """Symlinks each distribution's top-level entries (packages, modules, .dist-info) into ``site``."""
    for dist in dists.values():
        for top in {f.parts[0] for f in dist.files or ()}:
            if top in ("..", "__pycache__") or os.path.lexists(site / top):  # "..": scripts in bin/
                continue
            (site / top).symlink_to(dist.locate_file(top))


@pytest.fixture(scope="module")
def core_venv(dists, tmp_path_factory) -> Path:
    """A fresh venv (outside the tree) with the core dependencies linked in and the wheel installed."""
    venv = tmp_path_factory.mktemp("core") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    needed = distributions_needed(core_requirements(wheel_metadata(dists[1])))
    assert not STUDY_DISTRIBUTIONS & set(needed), "the core pulls in the study's packages"
    link_distributions(site, needed)
    # this pip drives the venv's interpreter; no index: the linked distributions must satisfy the wheel
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", "-q", dists[1]], env=clean_env())
    return venv


def venv_run(venv: Path, cmd, **env) -> subprocess.CompletedProcess:
    """Runs in the venv from a folder outside the checkout, with the checkout off sys.path."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600,
                          cwd=venv.parent, env=clean_env(**env))


CORE_CHECK = r"""
import importlib.util, json, sys
import torch
import fastkd
from fastkd.backends.cuda import build as _cuda_build

g = torch.Generator().manual_seed(0)
s = torch.randn(6, 11, generator=g, requires_grad=True)
t = torch.randn(6, 11, generator=g)
y = torch.randint(0, 11, (6,), generator=g)
h, w_s, w_t = torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g), torch.randn(11, 5, generator=g)
top_lp, top_ids = torch.log_softmax(t, -1).topk(4)  # a sparse teacher
losses, counts = {}, {}
for backend in ("torch", "triton"):
    meter = fastkd.CalibrationMeter(num_bins=10)
    calls = {
        "kl_loss": lambda: fastkd.kl_loss(s, t, temperature=2.0, backend=backend),
        "kd_loss": lambda: fastkd.kd_loss(s, t, y, meter=meter, backend=backend),
        "KLLoss": lambda: fastkd.KLLoss(backend=backend)(s, t),
        "KDLoss": lambda: fastkd.KDLoss(backend=backend)(s, t, y),
        "fused_linear_kd_loss": lambda: fastkd.fused_linear_kd_loss(h, w_s, h, w_t, y, backend=backend),
        "FusedLinearKDLoss": lambda: fastkd.FusedLinearKDLoss(backend=backend)(h, w_s, h, w_t, y),
        "sparse_kd_loss": lambda: fastkd.sparse_kd_loss(s, top_ids, top_lp, y, backend=backend),
        "SparseKDLoss": lambda: fastkd.SparseKDLoss(backend=backend)(s, top_ids, top_lp, y),
        "fused_linear_sparse_kd_loss": lambda: fastkd.fused_linear_sparse_kd_loss(h, w_s, top_ids, top_lp, y,
                                                                                  backend=backend),
    }
    for name, call in calls.items():
        loss = call()
        if loss.requires_grad:
            loss.backward()
        losses[f"{backend}/{name}"] = loss.item()
    counts[backend] = meter.compute().count
print(json.dumps({
    "fastkd": fastkd.__file__,
    "study_importable": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None],
    "losses": losses, "meter_counts": counts,
    "ece": fastkd.calibration_error(s.detach(), y, num_bins=10).item(),
    "sources": [str(p) for p in _cuda_build.SOURCES + _cuda_build.HEADERS],
}))
"""


@pytest.fixture(scope="module")
def core_check(core_venv) -> dict:
    # TRITON_INTERPRET=1: the Triton kernels (and their package data) run on CPU tensors
    done = venv_run(core_venv, [core_venv / "bin" / "python", "-c", CORE_CHECK, *STUDY_MODULES],
                    TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_core_install_runs_every_loss_the_meter_and_ece_without_the_study(core_venv, core_check):
    assert Path(core_check["fastkd"]).is_relative_to(core_venv)
    assert core_check["study_importable"] == []
    assert len(core_check["losses"]) == 18 and all(
        v == v and abs(v) < float("inf") for v in core_check["losses"].values())
    assert core_check["meter_counts"] == {"torch": 6, "triton": 6}
    assert 0 <= core_check["ece"] <= 1


def test_installed_cuda_sources_are_found_by_the_jit_build(core_venv, core_check):
    installed = [Path(p) for p in core_check["sources"]]
    for path in installed:
        assert path.parent.name == "kernels" and path.parent.parent.name == "fastkd"
        assert path.is_relative_to(core_venv) and path.read_bytes() == (ROOT / "kernels" / path.name).read_bytes()
    assert cxx_files(installed[0].parent) == cxx_files(ROOT / "kernels")


def test_sdist_sources_are_found_by_the_setup_py_build(dists, tmp_path):
    """setup.py (FASTKD_BUILD_CUDA=1) reads SOURCES from fastkd/backends/cuda/build.py by file, in the
    unpacked sdist: they must lie in that tree."""
    with tarfile.open(dists[0]) as tf:
        tf.extractall(tmp_path, filter="data")
    (tree,) = tmp_path.iterdir()
    spec = importlib.util.spec_from_file_location("sdist_cuda_build", tree / "fastkd" / "backends" / "cuda" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    needed = build.SOURCES + build.HEADERS
    assert build.SOURCES and all(p.is_file() and p.is_relative_to(tree.resolve()) for p in needed)


def test_cli_version_and_one_line_without_the_study_extra(core_venv):
    fastkd_script = core_venv / "bin" / "fastkd"
    version = venv_run(core_venv, [fastkd_script, "--version"])
    assert version.returncode == 0 and version.stdout.strip() == f"fastkd {fastkd.__version__}"
    distill = venv_run(core_venv, [fastkd_script, "distill"])
    assert distill.returncode == 1 and distill.stdout == ""
    (line,) = distill.stderr.strip().splitlines()
    assert 'pip install "fastkd[study]"' in line and "scikit-learn" in line


def test_cli_names_the_extra_when_torchvision_is_missing(monkeypatch, capsys):
    """CIFAR's torchvision is imported when the data load; a missing one ends the same way."""
    import fastkd.study.run
    from fastkd.study.cli import main

    def no_torchvision(cfg):
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    monkeypatch.setattr(fastkd.study.run, "run_study", no_torchvision)
    assert main(["distill", "--dataset", "cifar10"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == 'fastkd: error: distill needs torchvision, not installed: pip install "fastkd[study]"'


def test_cache_teacher_without_tqdm_names_the_extra_before_any_work(monkeypatch, capsys, tmp_path):
    import fastkd.study.cache_teacher
    from fastkd.study import cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "tqdm"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(fastkd.study.cache_teacher, "run", lambda args: pytest.fail("ran without tqdm"))
    assert cli.main(["cache-teacher", "--out", str(tmp_path / "cache"), "--k", "4"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == 'fastkd: error: cache-teacher needs tqdm, not installed: pip install "fastkd[study]"'


LIBRARY_ALONE = r"""
import json, sys
import torch

study = set(sys.argv[1:])
# torch.hub imports tqdm where it is installed: forgotten here, so that an import by fastkd shows
for m in [m for m in sys.modules if m.partition(".")[0] in study]:
    del sys.modules[m]
import fastkd

def loaded():
    return [m for m in sorted(sys.modules) if m.startswith("fastkd") or m.partition(".")[0] in study]

after_import = loaded()
g = torch.Generator().manual_seed(0)
s = torch.randn(3, 7, generator=g, requires_grad=True)
fastkd.kd_loss(s, torch.randn(3, 7, generator=g), torch.tensor([0, 6, 2])).backward()
print(json.dumps({"import": after_import, "kd_loss": loaded()}))
"""


def test_the_library_imports_neither_the_study_nor_its_extra():
    """fastkd/study/ sits beside the library: ``import fastkd`` and a kd_loss call import neither it
    nor a package of the study extra (installed here)."""
    assert all(importlib.util.find_spec(m) is not None for m in ("sklearn", "tqdm", "matplotlib"))
    done = subprocess.run([sys.executable, "-c", LIBRARY_ALONE, *STUDY_MODULES], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    for when, modules in seen.items():
        assert "fastkd.loss" in modules, (when, modules)
        assert not [m for m in modules if m.startswith("fastkd.study") or not m.startswith("fastkd")], (when, modules)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NVCC, reason="no CUDA toolkit on this machine")
def test_installed_extension_compiles_for_sm90(core_venv, tmp_path):
    """The JIT build of the installed copy, as a first backend="cuda" call does it, for sm_90."""
    ninja = shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))
    assert ninja, "the test extra installs ninja"  # beside this interpreter when its venv is not activated
    script = ("import os; from fastkd.backends.cuda import build as _cuda_build; ext = _cuda_build.load(); "
              "assert callable(ext.kd_forward) and callable(ext.scale_grad); "
              "print(ext.__file__); print(os.environ['CUDA_HOME'])")
    done = venv_run(core_venv, [core_venv / "bin" / "python", "-c", script], TORCH_EXTENSIONS_DIR=str(tmp_path),
                    TORCH_CUDA_ARCH_LIST="9.0",
                    PATH=os.pathsep.join([os.path.dirname(ninja), os.environ.get("PATH", "")]))
    assert done.returncode == 0, done.stderr[-3000:]
    library, cuda_home = done.stdout.strip().splitlines()[-2:]
    build_file = next(tmp_path.rglob("build.ninja")).read_text()
    assert str(core_venv) in build_file and "sm_90" in build_file  # the installed sources, for sm_90
    assert (Path(cuda_home) / "bin").is_dir() and Path(library).is_file()


# --- the README's first command: the study extra and nothing else -------------------------------

TEST_ONLY = {"transformers", "trl", "torchdistill", "datasets", "pytest", "torchmetrics"}  # what [all] adds


@pytest.fixture(scope="module")
def study_venv(dists, tmp_path_factory) -> Path:
    """A fresh venv (outside the tree) holding the core and the study extra, with the wheel installed
    as ``pip install "fastkd[study]"`` installs it: the README's first command."""
    meta = wheel_metadata(dists[1])
    study = [Requirement(r) for r in meta.get_all("Requires-Dist") if 'extra == "study"' in r]
    for r in study:  # pip asked for the extra, so its requirements hold
        r.marker = None
    needed = distributions_needed(core_requirements(meta) + study)
    assert not TEST_ONLY & set(needed), "the study extra pulls in the test suite's packages"
    venv = tmp_path_factory.mktemp("study") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    link_distributions(site, needed)
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", "-q", f"{dists[1]}[study]"], env=clean_env())
    return venv


def test_readme_first_command_the_study_extra_is_all_fastkd_distill_needs(study_venv, tmp_path):
    """`pip install -e ".[study]" && fastkd distill`: with the core and the study extra alone (none of
    transformers, TRL, torchdistill, pytest), the study runs (one epoch of each model) and reports."""
    python = study_venv / "bin" / "python"
    absent = venv_run(study_venv, [python, "-c", "import importlib.util, sys; "
                                   "print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])", *TEST_ONLY])
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    done = venv_run(study_venv, [study_venv / "bin" / "fastkd", "distill", "--epochs", "1", "--teacher-epochs", "1",
                                 "--no-progress", "--out-dir", tmp_path], OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distilled student" in done.stdout
    report = json.loads((tmp_path / "digits-s0" / "report.json").read_text())
    assert set(report["results"]) == {"teacher", "student", "distilled"}
