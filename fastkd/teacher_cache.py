"""The offline teacher cache: per row, a sparse teacher for ``fastkd.sparse_kd_loss``, written
once, read memory-mapped. Two kinds:

- ``top_k``: the teacher's K most likely classes and their log-probabilities at T = 1;
- ``sampled``: S draws from the tempered teacher ``softmax(logits / T)`` (T recorded in the cache:
  the training temperature), kept as the distinct classes drawn with their counts
  (:func:`sample_teacher`). The reader returns ``log(count / S)``, to be used with
  ``sparse_kd_loss(..., teacher_temperature=cache.temperature)``: counts / S is an unbiased
  estimate of the tempered teacher, so the student's gradient is unbiased for the dense
  teacher's at that T (the loss value is not: sum q log q of an estimate is not the entropy).

A cache is a folder::

    index.json                   what the cache holds; written last (fields below)
    shard-00000-ids.npy          int32 (rows in the shard, *row_shape, K), -1 = no entry
    shard-00000-logprobs.npy     top_k: float16, or bfloat16 kept as its uint16 bit pattern
    shard-00000-counts.npy       sampled: uint16, >= 1 on a listed id, 0 on padding, sum S per row
    ...

``index.json`` (version 2)::

    format          "fastkd-teacher-cache"
    version         2 (version 1, written before sampled caches, is read as a top_k cache at T = 1)
    kind            "top_k" | "sampled"
    temperature     the teacher's temperature: 1.0 for top_k, T (> 0, finite) for sampled
    samples         sampled only: S, the draws per row (1 to 65535); K = S
    rows, row_shape, k, vocab
    ids_dtype       "int32"
    logprobs_dtype  top_k only: "float16" | "bfloat16"
    counts_dtype    sampled only: "uint16"
    inputs_sha256   sha256 of the inputs the teacher ran over (:func:`fingerprint`), or null
    source          JSON: the teacher and data it came from
    shards          [{"ids": file, "logprobs" | "counts": file, "rows": n}, ...]

A row is one item of the data set the teacher ran over: for a classifier ``row_shape`` is ``()``
(one image, K entries), for a causal LM it is ``(positions,)`` (one sequence of tokens, K entries
per token). Top-K entries are sorted by log-probability, highest first, so the first k columns of
a top-K cache are the top-k cache for any k <= K. Sampled entries are sorted by count, highest
first, ties by id, padding last; a sampled row is whole only with all its S columns.

Why numpy ``.npy`` shards and a JSON index: numpy is already a core dependency (safetensors would
do the same job but only arrives with transformers, and the study's cache must work without it);
the format is small, documented and stable (NEP 1), readable by any tool without fastkd; its
header states dtype and shape, so one ``stat`` per shard tells a truncated file from a whole one;
and ``np.load(mmap_mode="r")`` maps it with random row access at no cost until a row is read,
in every DataLoader worker. numpy has no bfloat16, so bf16 log-probabilities are stored as their
16-bit pattern (lossless) and viewed back as ``torch.bfloat16``.

An interrupted write leaves no cache that looks complete: shards go into a hidden sibling folder,
the index is written after every shard is on disk, and only then is the folder renamed into place.
Every shard's header and size are checked when a cache is opened; the rows themselves (ids in the
vocabulary, counts summing to S) when they are read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch

FORMAT = "fastkd-teacher-cache"
VERSION = 2
READS = (1, 2)  # the format versions this reader understands
INDEX = "index.json"
KINDS = ("top_k", "sampled")
# name -> (how numpy stores it, what the reader returns)
LOGPROB_DTYPES = {"float16": (np.dtype(np.float16), torch.float16),
                  "bfloat16": (np.dtype(np.uint16), torch.bfloat16)}
IDS_DTYPE = np.dtype(np.int32)
COUNTS_DTYPE = np.dtype(np.uint16)
MAX_SAMPLES = np.iinfo(np.uint16).max  # a count never exceeds S
PAD_ID = -1
DEFAULT_SHARD_BYTES = 256 << 20


class CacheError(ValueError):
    """A teacher cache that cannot be written or read as asked (the CLI prints it as one line)."""


def top_k_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32, log-probabilities fp32) of the k most likely classes of ``log_softmax(logits)``
    at T = 1 over the last dimension, highest first. Computed in fp32 whatever the logits' dtype."""
    if not 1 <= k <= logits.shape[-1]:
        raise CacheError(f"k must lie in [1, {logits.shape[-1]}] (the vocabulary), got {k}")
    logprobs, ids = logits.float().log_softmax(-1).topk(k, dim=-1)
    return ids.to(torch.int32), logprobs


def sample_teacher(logits: torch.Tensor, samples: int, temperature: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws ``samples`` classes per row from ``softmax(logits / temperature)`` (with replacement)
    and keeps each distinct class once with its count: ``(ids int32 (..., S), counts int32 (..., S))``
    with S = ``samples``, ids sorted by count (highest first; ties by id), padded with id -1 and
    count 0 where a row drew fewer than S distinct classes. Every row's counts sum to S.

    ``counts / S`` is an unbiased estimate of the tempered teacher's probabilities, so a student
    trained on ``log(counts / S)`` with ``teacher_temperature=temperature`` gets gradients unbiased
    for the dense teacher's at that temperature. Computed in fp32 whatever the logits' dtype."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CacheError(f"samples must be a positive integer, got {samples!r}")
    if torch.is_tensor(temperature) and temperature.dim() == 0 and temperature.is_floating_point():
        temperature = float(temperature)
    if not _positive_number(temperature):
        raise CacheError(f"temperature must be a positive finite number, got {temperature!r}")
    if not torch.is_tensor(logits) or not logits.dtype.is_floating_point or logits.dim() < 1 \
            or logits.shape[-1] < 1:
        raise CacheError("logits must be a floating-point tensor (..., vocab) with vocab >= 1")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    probs = (logits.detach().float() / temperature).softmax(-1).reshape(-1, vocab)
    rows = probs.shape[0]
    if rows == 0:
        empty = torch.empty(*lead, samples, dtype=torch.int32, device=logits.device)
        return empty.fill_(PAD_ID), torch.zeros_like(empty)
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator).sort(-1).values
    # runs of equal ids in each sorted row are the distinct classes; run r goes to column r
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = starts.long().cumsum(-1) - 1
    counts = torch.zeros_like(draws).scatter_add_(1, run, torch.ones_like(draws))
    ids = torch.full_like(draws, PAD_ID).scatter_(1, run, draws)  # every member of a run writes its id
    counts, order = counts.sort(dim=-1, descending=True, stable=True)  # padding (count 0) goes last
    ids = ids.gather(1, order)
    return (ids.to(torch.int32).reshape(*lead, samples), counts.to(torch.int32).reshape(*lead, samples))


def fingerprint(inputs) -> str:
    """sha256 of an array's dtype, shape and bytes: ties a cache to the inputs it was computed on."""
    a = inputs.detach().cpu().numpy() if torch.is_tensor(inputs) else np.asarray(inputs)
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _shard_name(i: int, what: str) -> str:
    return f"shard-{i:05d}-{what}.npy"


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _save_synced(path: Path, array: np.ndarray):
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _new_folder(parent: Path, prefix: str, suffix: str) -> Path:
    """A new folder under a name no other writer has, with the permissions the umask gives (the cache
    is this folder renamed; tempfile.mkdtemp would make it readable by its owner only)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _sync_folder(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TeacherCacheWriter:
    """Writes a cache folder at ``path``, one batch of rows at a time, atomically::

        with TeacherCacheWriter("cache", k=10, vocab=10) as w:            # top-10
            for x in batches:
                w.add_logits(teacher(x))          # or w.add(ids, logprobs) from a serving engine

        with TeacherCacheWriter("cache", samples=16, temperature=4.0, vocab=10) as w:   # sampled
            for x in batches:
                w.add_logits(teacher(x))          # or w.add_samples(ids, counts)

    A sampled cache draws with ``generator`` (a ``torch.Generator`` on the logits' device; None:
    torch's global one). ``rows`` (if given) is checked when the writer closes: a teacher loop that
    skipped a batch is an error, not a short cache. ``inputs_sha256`` (see :func:`fingerprint`) and
    ``source`` (any JSON-able description of the teacher and data) go into the index. An exception
    inside the ``with`` block removes the partial folder; ``path`` is never left half written.
    Other files put into ``writer.partial`` (the folder being written) move into place with the
    cache."""

    def __init__(self, path, *, vocab: int, k: int | None = None, samples: int | None = None,
                 temperature: float | None = None, row_shape: tuple[int, ...] = (), dtype: str | None = None,
                 rows: int | None = None, inputs_sha256: str | None = None, source: dict | None = None,
                 overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 generator: torch.Generator | None = None):
        self.kind = "top_k" if samples is None else "sampled"
        if self.kind == "top_k":
            dtype = dtype or "float16"
            if dtype not in LOGPROB_DTYPES:
                raise CacheError(f"dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {dtype!r}")
            if k is None or not 1 <= k <= vocab:
                raise CacheError(f"k must lie in [1, vocab={vocab}], got {k}")
            if temperature not in (None, 1, 1.0):
                raise CacheError(f"a top-K cache holds log-probabilities at T = 1, got temperature={temperature!r}")
            temperature = 1.0
        else:
            if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
                raise CacheError(f"samples must be an integer in [1, {MAX_SAMPLES}], got {samples!r}")
            if not _positive_number(temperature):
                raise CacheError(f"temperature must be a positive finite number, got {temperature!r}")
            if k not in (None, samples):
                raise CacheError(f"a sampled cache keeps all S = {samples} columns per row, got k={k}")
            if dtype is not None:
                raise CacheError(f"a sampled cache stores counts (uint16), not log-probabilities; got dtype={dtype!r}")
            k, temperature = samples, float(temperature)
        self.path = Path(path)
        self._check_target(overwrite)
        self.k, self.vocab, self.dtype = k, vocab, dtype
        self.samples, self.temperature, self.generator = samples, temperature, generator
        self.row_shape = tuple(int(d) for d in row_shape)
        self.expected_rows, self.overwrite = rows, overwrite
        self.meta = {"inputs_sha256": inputs_sha256, "source": source or {}}
        row_bytes = math.prod(self.row_shape) * k * (IDS_DTYPE.itemsize + 2)
        self.shard_rows = max(1, shard_bytes // max(row_bytes, 1))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = _new_folder(self.path.parent, f".{self.path.name}.", ".partial")
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.rows = 0

    def _check_target(self, overwrite: bool):
        if self.path.exists() and not overwrite:
            raise CacheError(f"{self.path} exists; pass overwrite=True (--overwrite) to replace it")
        if self.path.exists() and not (self.path / INDEX).is_file():
            raise CacheError(f"{self.path} exists and is not a teacher cache; not replacing it")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def add_logits(self, logits: torch.Tensor):
        """Adds rows of teacher logits ``(B, *row_shape, vocab)``: keeps their top-K log-probs, or
        (sampled) S draws from ``softmax(logits / temperature)`` as ids and counts."""
        if logits.shape[-1] != self.vocab:
            raise CacheError(f"logits have {logits.shape[-1]} classes, the cache's vocab is {self.vocab}")
        if self.kind == "sampled":
            self.add_samples(*sample_teacher(logits, self.samples, self.temperature, self.generator))
        else:
            self.add(*top_k_logprobs(logits, self.k))

    def _check_ids(self, ids: torch.Tensor, other: torch.Tensor, other_name: str):
        shape = (*self.row_shape, self.k)
        if ids.shape != other.shape or tuple(ids.shape[1:]) != shape:
            raise CacheError(f"ids {tuple(ids.shape)} and {other_name} {tuple(other.shape)} must both "
                             f"be (rows, {', '.join(map(str, shape))})")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise CacheError(f"ids must be integers, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < PAD_ID or int(ids.max()) >= self.vocab):
            raise CacheError(f"ids must lie in [-1, {self.vocab}), got [{int(ids.min())}, {int(ids.max())}]")

    def add(self, ids: torch.Tensor, logprobs: torch.Tensor):
        """Adds rows of top-K entries: ids ``(B, *row_shape, K)`` in [-1, vocab) (-1 = no entry,
        at the end of a row) and their log-probabilities at T = 1, highest first."""
        if self.kind != "top_k":
            raise CacheError("add() takes top-K log-probabilities; a sampled cache takes add_samples(ids, counts)")
        self._check_ids(ids, logprobs, "logprobs")
        if not logprobs.dtype.is_floating_point:
            raise CacheError(f"logprobs must be floats, got {logprobs.dtype}")
        if logprobs.numel() and float(logprobs.nan_to_num(0.0).max()) > 1e-3:
            raise CacheError("logprobs must be log-probabilities (<= 0), got a positive value; "
                             "pass logits to add_logits instead")
        store, _ = LOGPROB_DTYPES[self.dtype]
        lp = logprobs.detach().to(torch.bfloat16 if self.dtype == "bfloat16" else torch.float16)
        lp = lp.view(torch.int16) if self.dtype == "bfloat16" else lp
        self._append(ids, lp.cpu().numpy().view(store))

    def add_samples(self, ids: torch.Tensor, counts: torch.Tensor):
        """Adds sampled rows: ids ``(B, *row_shape, S)`` in [-1, vocab), each class at most once per
        row, and their counts (>= 1 on a listed id, 0 on padding, S in all): what
        :func:`sample_teacher` returns. Stored sorted by count, highest first, ties by id."""
        if self.kind != "sampled":
            raise CacheError("add_samples() takes sampled rows; a top-K cache takes add(ids, logprobs)")
        self._check_ids(ids, counts, "counts")
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise CacheError(f"counts must be integers, got {counts.dtype}")
        ids, counts = ids.detach().cpu().long(), counts.detach().cpu().long()
        listed = ids >= 0
        if (counts[listed] < 1).any() or (counts[~listed] != 0).any():
            raise CacheError("counts must be >= 1 on a listed id and 0 on padding (id -1)")
        sums = counts.sum(-1)
        if (sums != self.samples).any():
            raise CacheError(f"every row's counts must sum to samples={self.samples}, got "
                             f"{int(sums[sums != self.samples][0])}")
        by_id = ids.where(listed, self.vocab).sort(-1).values  # padding last
        if ((by_id[..., 1:] == by_id[..., :-1]) & (by_id[..., 1:] < self.vocab)).any():
            raise CacheError("a row lists an id twice; give each class once with its count")
        order = ids.sort(dim=-1, stable=True).indices  # by id, then stably by count: ties stay by id
        ids, counts = ids.gather(-1, order), counts.gather(-1, order)
        order = counts.sort(dim=-1, descending=True, stable=True).indices  # padding (count 0) last
        ids, counts = ids.gather(-1, order), counts.gather(-1, order)
        self._append(ids, counts.numpy().astype(COUNTS_DTYPE))

    def _append(self, ids: torch.Tensor, values: np.ndarray):
        self.pending.append((ids.detach().cpu().numpy().astype(IDS_DTYPE, copy=False), values))
        self.pending_rows += len(ids)
        while self.pending_rows >= self.shard_rows:
            self._write_shard(self.shard_rows)

    def _write_shard(self, n: int):
        """Writes the first n pending rows as the next shard."""
        ids = np.concatenate([p[0] for p in self.pending])
        values = np.concatenate([p[1] for p in self.pending])
        self.pending = [(ids[n:], values[n:])] if len(ids) > n else []
        self.pending_rows = len(ids) - n
        what = "counts" if self.kind == "sampled" else "logprobs"
        names = {"ids": _shard_name(len(self.shards), "ids"), what: _shard_name(len(self.shards), what)}
        _save_synced(self.partial / names["ids"], ids[:n])
        _save_synced(self.partial / names[what], values[:n])
        self.shards.append({**names, "rows": n})
        self.rows += n

    def close(self) -> Path:
        """Writes what is pending and the index, then moves the cache into place; returns its path."""
        try:
            if self.pending_rows:
                self._write_shard(self.pending_rows)
            if self.expected_rows is not None and self.rows != self.expected_rows:
                raise CacheError(f"{self.path}: {self.rows} rows were written, {self.expected_rows} "
                                 "expected; the cache is not kept")
            self._write_index()
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        return self.path

    def _write_index(self):
        kind = {"kind": self.kind, "temperature": self.temperature,
                **({"samples": self.samples} if self.kind == "sampled" else {})}
        values = {"counts_dtype": "uint16"} if self.kind == "sampled" else {"logprobs_dtype": self.dtype}
        index = {"format": FORMAT, "version": VERSION, **kind, "rows": self.rows, "row_shape": list(self.row_shape),
                 "k": self.k, "vocab": self.vocab, "ids_dtype": "int32", **values,
                 **self.meta, "shards": self.shards}
        with open(self.partial / INDEX, "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _sync_folder(self.partial)

    def _move_into_place(self):
        self._check_target(self.overwrite)
        old = None
        if self.path.exists():  # overwrite: the old cache steps aside, the new one steps in
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.rename(self.path, old)
        os.rename(self.partial, self.path)
        _sync_folder(self.path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self):
        """Removes the partial folder (nothing at ``path`` is touched)."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.pending, self.pending_rows = [], 0


def _read_npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, offset of the data) of a .npy file, from its header alone."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = readers[version](f)
            offset = f.tell()
    except FileNotFoundError:
        raise CacheError(f"{path}: missing (listed in {INDEX})") from None
    except (ValueError, KeyError, OSError) as e:
        raise CacheError(f"{path}: not a readable .npy file ({e or type(e).__name__})") from None
    if fortran:
        raise CacheError(f"{path}: Fortran-ordered array; a cache shard is C-ordered")
    return dtype, shape, offset


def _open_shard_file(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """Maps a shard after checking its header against the index and its size against its header."""
    got_dtype, got_shape, offset = _read_npy_header(path)
    if got_dtype != dtype or tuple(got_shape) != shape:
        raise CacheError(f"{path}: holds {got_dtype} {tuple(got_shape)}, {INDEX} says {dtype} {shape}")
    expected, size = offset + math.prod(shape) * dtype.itemsize, path.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise CacheError(f"{path}: {size} bytes, {expected} bytes expected from its header: {what}")
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)  # mmap cannot map zero bytes
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_index(folder: Path) -> dict:
    """The index of the cache in ``folder``, checked, a version-1 index filled in as what it is
    (a top_k cache at T = 1)."""
    path = folder / INDEX
    if not folder.is_dir():
        raise CacheError(f"teacher cache {folder}: no such folder")
    if not path.is_file():
        raise CacheError(f"{path}: missing; {folder} is not a teacher cache, or its write did not finish")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CacheError(f"{path}: not a fastkd teacher cache index (no \"format\": \"{FORMAT}\")")
    version = index.get("version")
    if version not in READS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
        raise CacheError(f"{path}: format version {version!r}; this fastkd reads versions "
                         f"{', '.join(map(str, READS))}" + ("; a newer fastkd wrote it" if newer else ""))
    if version == 1:
        index = {**index, "kind": "top_k", "temperature": 1.0}
    try:
        _check_index_fields(index)
    except KeyError as e:
        raise CacheError(f"{path}: corrupt (no field {e})") from None
    except (TypeError, ValueError) as e:
        raise CacheError(f"{path}: corrupt ({e})") from None
    return index


def _check_index_fields(index: dict):
    if index["kind"] not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {index['kind']!r}")
    if not _positive_number(index["temperature"]):
        raise ValueError(f"temperature must be a positive finite number, got {index['temperature']!r}")
    for key in ("rows", "k", "vocab"):
        if not isinstance(index[key], int) or index[key] < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {index[key]!r}")
    if index["ids_dtype"] != "int32":
        raise ValueError(f"unknown ids_dtype {index['ids_dtype']!r}")
    if index["kind"] == "top_k":
        if index["temperature"] != 1:
            raise ValueError(f"temperature of a top_k cache must be 1.0 (log-probabilities at T = 1), "
                             f"got {index['temperature']!r}")
        if index["logprobs_dtype"] not in LOGPROB_DTYPES:
            raise ValueError(f"unknown logprobs_dtype {index['logprobs_dtype']!r}")
    else:
        samples = index["samples"]
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
            raise ValueError(f"samples must be an integer in [1, {MAX_SAMPLES}], got {samples!r}")
        if index["k"] != samples:
            raise ValueError(f"k of a sampled cache must equal samples ({samples}), got {index['k']}")
        if index["counts_dtype"] != "uint16":
            raise ValueError(f"unknown counts_dtype {index['counts_dtype']!r}")
    if not all(isinstance(d, int) and d >= 0 for d in index["row_shape"]):
        raise ValueError(f"row_shape must be non-negative integers, got {index['row_shape']!r}")
    if not all(isinstance(s["rows"], int) and s["rows"] >= 0 for s in index["shards"]):
        raise ValueError("every shard's rows must be a non-negative integer")
    counted = sum(s["rows"] for s in index["shards"])
    if counted != index["rows"]:
        raise ValueError(f"the shards hold {counted} rows, rows says {index['rows']}")
    for s in index["shards"]:
        for key in ("ids", _values_key(index)):
            if Path(s[key]).name != s[key]:
                raise ValueError(f"shard file {s[key]!r} is not a plain file name")


def _values_key(index: dict) -> str:
    """The name of a shard's second file in the index: what the row's ids come with."""
    return "counts" if index["kind"] == "sampled" else "logprobs"


class TeacherCache(torch.utils.data.Dataset):
    """A teacher cache opened for reading: ``cache[i]`` is row i's ``(ids, logprobs)``, each
    ``(*row_shape, K)`` (ids int32, -1 = no entry), aligned with item i of the inputs the teacher
    ran over; ``cache.batch(index)`` gathers rows for a batch. ``logprobs``: float16 or bfloat16
    (a top_k cache, at T = 1), or float32 ``log(count / S)`` (a sampled cache; -inf on padding).

    ``cache.kind`` ("top_k" | "sampled"), ``cache.temperature`` (the teacher's temperature: 1.0
    for top_k; pass it as ``sparse_kd_loss(..., teacher_temperature=cache.temperature)``) and
    ``cache.samples`` (S, or None) say what the rows are.

    Pass what you expect (``rows``, ``vocab``, ``k``, ``dtype``, ``row_shape``, ``inputs_sha256``)
    and a cache that differs is refused with a :class:`CacheError` naming the file and the
    mismatch. Every shard's header and size are checked on opening (a truncated shard is refused
    before training starts); the data stay on disk until read, and rows are checked as they are
    read (ids in the vocabulary; a sampled row's counts >= 1 on its ids, summing to S). ``k`` may
    also be smaller than a top_k cache's K with ``allow_larger_k=True``: the reader then returns
    the first ``k`` columns (a sampled row is whole only with all its S columns)."""

    def __init__(self, path, *, rows: int | None = None, vocab: int | None = None, k: int | None = None,
                 dtype: str | None = None, row_shape: tuple[int, ...] | None = None,
                 inputs_sha256: str | None = None, allow_larger_k: bool = False):
        self.path = Path(path)
        self.index = _read_index(self.path)
        self.kind, self.temperature = self.index["kind"], float(self.index["temperature"])
        self.samples = self.index["samples"] if self.kind == "sampled" else None
        self.dtype = "float32" if self.kind == "sampled" else self.index["logprobs_dtype"]
        self._check_expected(rows, vocab, k, dtype, row_shape, inputs_sha256, allow_larger_k)
        self.k = k if k is not None else self.index["k"]
        self.vocab, self.rows = self.index["vocab"], self.index["rows"]
        self.row_shape = tuple(self.index["row_shape"])
        self.starts = np.cumsum([0] + [s["rows"] for s in self.index["shards"]])
        self._maps = None
        self._open_shards()  # checks every shard now; maps are reopened lazily after pickling

    def _check_expected(self, rows, vocab, k, dtype, row_shape, inputs_sha256, allow_larger_k):
        where, idx = self.path / INDEX, self.index
        checks = [("rows", rows, idx["rows"]), ("vocab", vocab, idx["vocab"]),
                  ("logprobs dtype", dtype, self.dtype),
                  ("row shape", tuple(row_shape) if row_shape is not None else None, tuple(idx["row_shape"]))]
        for name, want, have in checks:
            if want is not None and want != have:
                raise CacheError(f"{where}: the cache's {name} is {have}, expected {want}")
        if k is not None and self.kind == "sampled" and k != idx["k"]:
            raise CacheError(f"{where}: the cache holds S = {idx['k']} samples per row (all needed), expected k={k}")
        if k is not None and not (k == idx["k"] or (allow_larger_k and 1 <= k <= idx["k"])):
            need = f"at least {k}" if allow_larger_k else str(k)
            raise CacheError(f"{where}: the cache holds the top-{idx['k']} entries per row, expected {need}")
        if inputs_sha256 is not None and idx.get("inputs_sha256") != inputs_sha256:
            raise CacheError(f"{where}: written for other inputs (sha256 {idx.get('inputs_sha256')}, "
                             f"these inputs {inputs_sha256}); its rows would not line up")

    def _open_shards(self):
        store = COUNTS_DTYPE if self.kind == "sampled" else LOGPROB_DTYPES[self.index["logprobs_dtype"]][0]
        values = _values_key(self.index)
        maps = []
        for s in self.index["shards"]:
            shape = (s["rows"], *self.index["row_shape"], self.index["k"])
            maps.append((_open_shard_file(self.path / s["ids"], IDS_DTYPE, shape),
                         _open_shard_file(self.path / s[values], store, shape)))
        self._maps = maps
        return maps

    def __getstate__(self):  # a memmap pickles as a full copy: DataLoader workers reopen instead
        return {**self.__dict__, "_maps": None}

    @property
    def source(self) -> dict:
        return self.index.get("source", {})

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        if not -self.rows <= i < self.rows:
            raise IndexError(f"row {i} out of range for a cache of {self.rows} rows")
        ids, lp = self.batch([i % self.rows])
        return ids[0], lp[0]

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index`` (a tensor, array or list of row numbers) as ``(ids, logprobs)`` of shape
        ``(len(index), *row_shape, k)``, read shard by shard, on the CPU."""
        idx = np.asarray(index.cpu() if torch.is_tensor(index) else index, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.rows):
            raise IndexError(f"rows [{idx.min()}, {idx.max()}] out of range for a cache of {self.rows} rows")
        maps = self._maps or self._open_shards()
        shape = (len(idx), *self.row_shape, self.k)
        ids, values = np.empty(shape, IDS_DTYPE), np.empty(shape, maps[0][1].dtype if maps else np.uint16)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard):
            at = np.nonzero(shard == s)[0]
            local = idx[at] - self.starts[s]
            ids[at] = maps[s][0][local, ..., :self.k]
            values[at] = maps[s][1][local, ..., :self.k]
            self._check_rows(int(s), idx[at], ids[at], values[at])
        return self._tensors(ids, values)

    def _check_rows(self, s: int, rows: np.ndarray, ids: np.ndarray, values: np.ndarray):
        """Refuses rows of shard ``s`` that no writer of this format makes (a damaged or hand-made
        cache): an id outside the vocabulary; in a sampled cache, counts that are not >= 1 on each
        listed id and 0 on padding, or do not sum to S."""
        shard = self.index["shards"][s]

        def refuse(file_key, bad, what):
            r = int(rows[np.nonzero(bad.reshape(len(rows), -1).any(-1))[0][0]])
            raise CacheError(f"{self.path / shard[file_key]}: row {r}: {what}")

        out = (ids < PAD_ID) | (ids >= self.vocab)
        if out.any():
            refuse("ids", out, f"ids outside [-1, {self.vocab}) (the vocabulary), e.g. {int(ids[out][0])}")
        if self.kind != "sampled":
            return
        listed = ids >= 0
        if (listed & (values == 0)).any():
            refuse("counts", listed & (values == 0), "counts must be >= 1 on a listed id, got 0")
        if (~listed & (values != 0)).any():
            refuse("counts", ~listed & (values != 0), "counts must be 0 on padding (id -1)")
        sums = values.astype(np.int64).sum(-1)
        if (sums != self.samples).any():
            bad = sums != self.samples
            refuse("counts", bad, f"counts sum to {int(sums[bad][0])}, not samples = {self.samples} ({INDEX})")

    def _tensors(self, ids: np.ndarray, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(np.array(ids, dtype=IDS_DTYPE))  # a private, writable copy
        if self.kind == "sampled":  # log(count / S), rounded once to float32; log 0 = -inf on padding
            with np.errstate(divide="ignore"):
                return ids, torch.from_numpy(np.log(values / self.samples).astype(np.float32))
        if self.dtype == "bfloat16":
            return ids, torch.from_numpy(np.array(values).view(np.int16)).view(torch.bfloat16)
        return ids, torch.from_numpy(np.array(values))

    def __repr__(self) -> str:
        kind = (f"sampled, samples={self.samples}, temperature={self.temperature:g}" if self.kind == "sampled"
                else "top_k")
        return (f"TeacherCache({str(self.path)!r}, {kind}, rows={self.rows}, row_shape={self.row_shape}, "
                f"k={self.k}, vocab={self.vocab}, dtype={self.dtype})")
