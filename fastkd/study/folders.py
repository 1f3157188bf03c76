"""A run folder belongs to one run: a new run refuses a folder another run wrote (``--resume``
continues that run, ``--overwrite`` replaces it), and ``--overwrite`` deletes what the earlier run
wrote (checkpoints, reports, figures, TensorBoard logs, teacher cache), so nothing stale is left for
a reader to mistake for this run's. Only the study's own files are deleted: a folder given by mistake
keeps everything else in it.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

# what `fastkd distill` writes into a run folder (fnmatch patterns; *.tmp: a checkpoint being written,
# .teacher-cache.*.partial: a teacher cache being written; tokenizer.json, sparse.png: the language-model
# study's)
RUN_FILES = ("config.json", "metrics.jsonl", "report.md", "report.json", "reliability.png", "curves.png",
             "teacher.pt", "student.pt", "distilled.pt", "distilled-*.pt", "*.pt.tmp", "tensorboard",
             "teacher-cache", ".teacher-cache.*.partial", "tokenizer.json", "sparse.png")
# what `fastkd distill --seeds` writes into its summary folder, besides one run folder s<S> per seed
SUMMARY_FILES = ("report.md", "report.json", "summary.png")
_SEED_FOLDER = re.compile(r"s[0-9]+")


def written_by_study(folder: Path, seeds: bool = False) -> list[Path]:
    """The entries of ``folder`` that a run (``seeds``: a multi-seed run) of the study wrote."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for pattern in (SUMMARY_FILES if seeds else RUN_FILES) for p in folder.glob(pattern)}
    if seeds:  # a seed's folder is a run folder
        found |= {p for p in folder.iterdir() if p.is_dir() and _SEED_FOLDER.fullmatch(p.name) and written_by_study(p)}
    return sorted(found)


def check_new_run(folder: Path, overwrite: bool, seeds: bool = False):
    """A ValueError when ``folder`` holds an earlier run and ``overwrite`` is not set."""
    if not overwrite and written_by_study(folder, seeds):
        raise ValueError(f"{folder} holds an earlier run: pass --resume to continue it, --overwrite to replace "
                         "it, or another --out-dir or --name for a new one")


def check_seeds_run(folder: Path, resume: bool, overwrite: bool) -> bool:
    """The rules for a ``--seeds`` folder: --resume and --overwrite exclude each other; without
    --resume an existing folder is refused unless --overwrite. True when the caller is to clear it."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the runs, or replace them")
    if resume:
        return False
    check_new_run(folder, overwrite, seeds=True)
    return overwrite


def clear(folder: Path, seeds: bool = False):
    """Deletes what an earlier run (``seeds``: multi-seed run) wrote into ``folder``."""
    for p in written_by_study(folder, seeds):
        if seeds and p.is_dir():  # a seed's run folder: its run's files, then the folder if that emptied it
            clear(p)
            if not any(p.iterdir()):
                p.rmdir()
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
