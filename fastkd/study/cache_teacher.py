"""``fastkd cache-teacher``: run a teacher once over a data set and keep, per row, its top-K
log-probabilities (``--k``) or S draws from it at the training temperature (``--sample S
--temperature T``: ids and counts) in a teacher cache (``fastkd.teacher_cache``) for
``sparse_kd_loss``.

Two sources:

- the study's data (``--dataset digits`` by default): the study's teacher, loaded from a checkpoint
  ``fastkd distill`` wrote (``--teacher-ckpt``) or trained here exactly as the study trains it
  (same seed, same schedule; its checkpoint is kept in the cache folder as ``teacher.pt``); one
  row per image of ``--split``, in the split's order;
- a Hugging Face causal LM (``--model``, a local folder for ``AutoModelForCausalLM``) over a
  token file (``--tokens``, a ``.npy`` or ``.pt`` integer array, one row per sequence): one row
  per sequence, K entries per position, aligned with the token file's rows.

Bad arguments end in one line on stderr and exit status 2, as ``fastkd distill``'s do.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..teacher_cache import LOGPROB_DTYPES, MAX_SAMPLES, TeacherCache, TeacherCacheWriter, fingerprint
from .config import StudyConfig, check_device, resolve_device
from .data import load_data
from .teachers import causal_lm_vocab, load_causal_lm, load_or_train_teacher, progress_bar, write_classifier_rows
from .train import _autocast

SPLITS = ("train", "val", "test")
DEFAULT_TEMPERATURE = StudyConfig.temperature  # a cache made with the defaults fits fastkd distill's
STUDY_OPTIONS = ("dataset", "data_dir", "teacher", "teacher_ckpt", "teacher_epochs", "seed", "split")


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``cache-teacher`` subcommand, added to the ``fastkd`` parser's subparsers."""
    p = sub.add_parser("cache-teacher", help="run a teacher once and store its top-K log-probabilities "
                       "(or S samples from it) for sparse_kd_loss",
                       description="Run a teacher once over a data set and store, per row, its top-K ids and "
                       "log-probabilities (--k), or S draws from it at the training temperature as ids and "
                       "counts (--sample, --temperature), in a teacher cache folder: the study's teacher over "
                       "its data (default), or a Hugging Face causal LM over a token file (--model, --tokens).")
    p.add_argument("--out", metavar="DIR", help="the cache folder to write (required)")
    p.add_argument("--k", type=int, help="entries kept per row: the teacher's top-K (this or --sample)")
    p.add_argument("--sample", type=int, metavar="S", help="instead of the top-K: S draws per row from "
                   "softmax(logits / --temperature), kept as the classes drawn and their counts")
    p.add_argument("--temperature", type=float, metavar="T", help="with --sample: the temperature of the "
                   f"draws, the one the student will be distilled at (default {DEFAULT_TEMPERATURE:g}, "
                   "fastkd distill's)")
    p.add_argument("--sample-seed", type=int, metavar="N", help="with --sample: seed of the draws (default 0)")
    p.add_argument("--dtype", help="top-K log-probability storage: float16 (default) | bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda[:i]")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    study = p.add_argument_group("the study's data (the default source)")
    study.add_argument("--dataset", help="digits (default) | cifar10 | cifar100")
    study.add_argument("--data-dir", metavar="DIR", help="where the CIFAR batches live")
    study.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    study.add_argument("--split", help="the rows cached: train (default) | val | test")
    study.add_argument("--teacher", help="teacher model (default by dataset, as fastkd distill)")
    study.add_argument("--teacher-ckpt", metavar="PATH", help="a teacher checkpoint fastkd distill wrote")
    study.add_argument("--teacher-epochs", type=int, help="epochs when training the teacher here "
                       "(default as fastkd distill)")
    study.add_argument("--seed", type=int, help="seed of the teacher trained here (default 0)")
    lm = p.add_argument_group("a Hugging Face causal LM over a token file")
    lm.add_argument("--model", metavar="DIR", help="local folder of the teacher (AutoModelForCausalLM)")
    lm.add_argument("--tokens", metavar="FILE", help=".npy or .pt of token ids, (sequences, positions)")
    lm.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default 8)")
    return p


def validate(args):
    """Rejects bad combinations before any model is loaded or data read."""
    if not args.out:
        raise ValueError("--out is required: the cache folder to write")
    if args.sample is None:
        if args.k is None:
            raise ValueError("--k K (the top-K kept per row) or --sample S (draws per row) is required")
        if args.k < 1:
            raise ValueError(f"--k must be an integer >= 1 (the entries kept per row), got {args.k}")
        for name in ("temperature", "sample_seed"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} goes with --sample (a top-K cache is at T = 1)")
        if args.dtype is not None and args.dtype not in LOGPROB_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {args.dtype!r}")
    else:
        if args.k is not None:
            raise ValueError("--k and --sample exclude each other: a top-K cache, or a sampled one")
        if not 1 <= args.sample <= MAX_SAMPLES:
            raise ValueError(f"--sample must be an integer in [1, {MAX_SAMPLES}] (draws per row), got {args.sample}")
        if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
            raise ValueError(f"--temperature must be a positive finite number, got {args.temperature}")
        if args.dtype is not None:
            raise ValueError("--dtype is for top-K caches; a sampled cache stores counts (uint16)")
    if bool(args.model) != bool(args.tokens):
        raise ValueError("--model and --tokens go together: a causal LM over a token file")
    if args.model:
        given = [o for o in STUDY_OPTIONS if getattr(args, o) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is for the study's data, not for --model")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    elif args.split is not None and args.split not in SPLITS:
        raise ValueError(f"unknown split {args.split!r}; choose from {', '.join(SPLITS)}")
    if args.teacher_ckpt and args.teacher_epochs is not None:
        raise ValueError("--teacher-ckpt and --teacher-epochs exclude each other (load or train)")
    check_device(args.device)


def cache_kind(args, device) -> dict:
    """The writer's arguments for what is kept per row: the top-K, or S draws (seeded, on the
    device the logits are on) at the training temperature."""
    if args.sample is None:
        return {"k": args.k, "dtype": args.dtype or "float16"}
    seed = args.sample_seed or 0
    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    return {"samples": args.sample, "temperature": temperature,
            "generator": torch.Generator(device=device).manual_seed(seed)}


def cache_study_teacher(args) -> Path:
    """The study's teacher (loaded or trained as ``fastkd distill`` would) over one split."""
    cfg = StudyConfig(dataset=args.dataset or "digits", data_dir=args.data_dir, download=args.download,
                      teacher=args.teacher, teacher_ckpt=args.teacher_ckpt, teacher_epochs=args.teacher_epochs,
                      seed=args.seed or 0, device=args.device, progress=args.progress).resolved()
    data = load_data(cfg.dataset, cfg.device, cfg.data_dir, cfg.download)
    split = args.split or "train"
    x = getattr(data, f"x_{split}")
    source = {"kind": "study", "dataset": cfg.dataset, "split": split, "teacher": cfg.teacher,
              "teacher_ckpt": cfg.teacher_ckpt, "seed": cfg.seed,
              "teacher_epochs": None if cfg.teacher_ckpt else cfg.teacher_epochs, **_sample_seed(args)}
    with TeacherCacheWriter(args.out, vocab=data.num_classes, rows=len(x), **cache_kind(args, x.device),
                            inputs_sha256=fingerprint(x), source=source, overwrite=args.overwrite) as w:
        teacher, _ = load_or_train_teacher(cfg, data, w.partial / "teacher.pt")  # kept with the cache
        write_classifier_rows(w, teacher, data, x, args.progress)
    return w.path


def _sample_seed(args) -> dict:
    return {"sample_seed": args.sample_seed or 0} if args.sample is not None else {}


def load_token_file(path: Path) -> np.ndarray:
    """A (sequences, positions) integer array from a .npy (memory-mapped) or .pt file."""
    if not path.is_file():
        raise ValueError(f"--tokens {path}: no such file")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"--tokens {path}: not a readable .npy file ({e})") from None
    elif path.suffix == ".pt":
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"--tokens {path}: cannot read ({type(e).__name__})") from None
        if not torch.is_tensor(loaded):
            raise ValueError(f"--tokens {path}: holds a {type(loaded).__name__}, not a tensor of token ids")
        tokens = loaded.numpy()
    else:
        raise ValueError(f"--tokens {path}: expected a .npy or .pt file")
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu" or tokens.shape[1] == 0:
        raise ValueError(f"--tokens {path}: expected a 2-D integer array (sequences, positions), "
                         f"got {tokens.dtype} of shape {tokens.shape}")
    return tokens


def cache_causal_lm(args) -> Path:
    """A causal LM's top-K at every position of every sequence of a token file."""
    device = torch.device(resolve_device(args.device))
    tokens = load_token_file(Path(args.tokens))
    folder = Path(args.model)
    if not folder.is_dir():
        raise ValueError(f"--model {folder}: no such folder (a local Hugging Face model folder)")
    vocab = causal_lm_vocab(folder)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):  # checked before loading weights
        raise ValueError(f"--tokens {args.tokens}: ids in [{tokens.min()}, {tokens.max()}], outside the "
                         f"model's vocabulary [0, {vocab})")
    model = load_causal_lm(folder, device, args.progress)
    rows, positions = tokens.shape
    source = {"kind": "hf-causal-lm", "model": str(args.model), "tokens": str(args.tokens), **_sample_seed(args)}
    with TeacherCacheWriter(args.out, vocab=vocab, row_shape=(positions,), rows=rows, **cache_kind(args, device),
                            inputs_sha256=fingerprint(tokens), source=source, overwrite=args.overwrite) as w, \
            progress_bar(total=rows, desc="teacher cache", unit="seq", disable=not args.progress) as bar:
        for lo in range(0, rows, args.batch_size):
            ids = torch.from_numpy(np.array(tokens[lo:lo + args.batch_size], dtype=np.int64)).to(device)
            with torch.inference_mode(), _autocast(device):
                w.add_logits(model(input_ids=ids).logits)
            bar.update(len(ids))
    return w.path


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20


def run(args) -> int:
    """Entry point of ``fastkd cache-teacher`` (``fastkd.study.cli`` parses, this runs)."""
    started = time.perf_counter()
    try:
        validate(args)
        path = cache_causal_lm(args) if args.model else cache_study_teacher(args)
    except (ValueError, OSError) as e:  # CacheError and DataError are ValueErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # some libraries write several
        print(f"fastkd: error: {first}", file=sys.stderr)
        return 2
    print(f"{TeacherCache(path)!r}: {_size_mb(path):.1f} MB, {time.perf_counter() - started:.1f} s")
    return 0
