"""Data sets for the study, kept on the training device as whole tensors.

``digits``: scikit-learn's bundled 8x8 digits (1,797 images, nothing to download), a fixed
stratified train / validation / test split. ``cifar10`` / ``cifar100``: torchvision's dataset
classes read the standard python-pickle batches from ``data_dir`` (downloaded only with
``download=True``); images stay uint8 on the device and are normalised and augmented there.

A data file that cannot be loaded as asked raises :class:`DataError` naming the file and what is
wrong with it (the CLI prints it as one line, exit status 2), before any model is built or anything
written. torchvision reads the CIFAR files; its result is checked (uint8 images, one label per image,
labels in range, the class names). When torchvision fails (bytes keys, a truncated pickle: errors
that name no file) or its result is wrong (rows of the wrong length read as other images, labels that
would only fail during training), each file is unpickled again and checked on its own to name the
one at fault. A good data set is read once. What no check can see: pixels in another order within
rows of the right length (height, width, channels instead of channels first).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
PIXELS = 3 * 32 * 32  # one CIFAR image: a row of uint8, the red plane, then green, then blue


class DataError(ValueError):
    """A data set that cannot be loaded as asked (the CLI prints it as one line)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


@dataclass
class DataBundle:
    name: str
    num_classes: int
    class_names: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: bool  # random crop + flip each step (the inputs then never repeat exactly)
    _norm: tuple | None = field(default=None, repr=False, compare=False)  # (mean, std) on the device

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images -> normalised float, channels_last; augmented when a generator is given."""
        if x.dtype != torch.uint8:
            return x
        x = x.float().div_(255)
        if generator is not None and self.augment:
            x = random_crop_flip(x, generator)
        mean, std = self._normalisation(x.device)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def _normalisation(self, device):
        """CIFAR's mean and std on the device, made once (a copy per step would sync the host)."""
        if self._norm is None or self._norm[0].device != device:
            self._norm = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CIFAR_MEAN, CIFAR_STD))
        return self._norm


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image random crop (zero padding ``pad``) and horizontal flip of a (N, C, H, W) batch,
    on x's device with a generator there: one gather, no Python loop, no host round trip."""
    n, _, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def _stratified_split(y: torch.Tensor, fractions, seed: int):
    """Index tensors of a per-class shuffled split (same seed, same split)."""
    g = torch.Generator().manual_seed(seed)
    parts = [[] for _ in fractions]
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        bounds = [0]
        for f in fractions[:-1]:
            bounds.append(bounds[-1] + round(f * len(idx)))
        bounds.append(len(idx))
        for p, lo, hi in zip(parts, bounds[:-1], bounds[1:]):
            p.append(idx[lo:hi])
    return [torch.sort(torch.cat(p)).values for p in parts]


def _digits_file() -> str:
    """Where scikit-learn keeps the digits (for error messages)."""
    try:
        from importlib import resources

        return str(resources.files("sklearn.datasets.data") / "digits.csv.gz")
    except Exception:  # an unusual install: name the data set instead
        return "scikit-learn's digits.csv.gz"


def _sklearn_digits():
    """(pixels, labels) of scikit-learn's digits as numpy arrays; DataError naming the file if they
    cannot be read or are not 8x8 images labelled 0-9."""
    from sklearn.datasets import load_digits as sk_digits

    try:
        ds = sk_digits()
    except Exception as e:  # a truncated or edited digits.csv.gz: gzip, numpy or sklearn errors
        raise DataError(f"cannot read scikit-learn's digits ({_digits_file()}): {type(e).__name__}: "
                        f"{_first_line(e)}; reinstalling scikit-learn restores the file") from None
    x, y = np.asarray(ds.data), np.asarray(ds.target)
    problem = None
    if x.ndim != 2 or x.shape[1] != 64 or len(x) == 0:
        problem = f"pixels of shape {x.shape}, not (N, 64)"
    elif not np.isfinite(x).all():
        problem = "non-finite pixels"
    elif y.shape != (len(x),) or y.dtype.kind not in "iu":
        problem = f"labels of shape {y.shape} and dtype {y.dtype} for {len(x)} images"
    elif y.min() < 0 or y.max() > 9:
        i = int(np.argmax((y < 0) | (y > 9)))
        problem = f"label {y[i]} (image {i}) outside 0-9"
    if problem:
        raise DataError(f"scikit-learn's digits ({_digits_file()}) hold {problem}; reinstalling "
                        "scikit-learn restores the file")
    return x, y


def load_digits(device, seed: int = 0) -> DataBundle:
    pixels, labels = _sklearn_digits()
    x = torch.tensor(pixels, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    train, val, test = _stratified_split(y, (0.6, 0.2, 0.2), seed)
    dev = torch.device(device)
    return DataBundle("digits", 10, [str(c) for c in range(10)], x[train].to(dev), y[train].to(dev),
                      x[val].to(dev), y[val].to(dev), x[test].to(dev), y[test].to(dev), augment=False)


def _cifar_class(name):
    from torchvision import datasets
    from torchvision.datasets.vision import VisionDataset

    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    class Cifar(base):
        # torchvision checks the MD5 of each batch file; with None it checks that the file exists,
        # so subsets and locally written fixtures load too (a download still verifies its archive).
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

        @classmethod
        def fetch(cls, root: str):
            """torchvision's download (nothing to do when every file is there), without reading the files."""
            ds = cls.__new__(cls)
            VisionDataset.__init__(ds, root)
            ds.download()

    return Cifar


def _unpickle(path: Path):
    """The object in one CIFAR file, unpickled as torchvision unpickles it (latin1: the originals are
    Python 2 pickles)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # EOFError, UnpicklingError, ValueError...: whatever the bytes make pickle raise
        raise DataError(f"{path} cannot be unpickled ({type(e).__name__}: {_first_line(e)}): "
                        "truncated, or not a CIFAR python-pickle file") from None


def _entries(path: Path, obj, keys: tuple[str, ...]) -> list:
    """``obj[k]`` for each key; DataError when ``obj`` is not a dict with those str keys."""
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR file")
    missing = [k for k in keys if k not in obj]
    if missing and all(k.encode() in obj for k in missing):  # pickled from Python 3 with bytes keys
        raise DataError(f"{path} has bytes keys ({', '.join(repr(k.encode()) for k in keys)}); torchvision "
                        f"reads str keys ({', '.join(map(repr, keys))}): pickle the dict with str keys")
    if missing:
        found = ", ".join(map(repr, list(obj)[:6])) + (", ..." if len(obj) > 6 else "")
        raise DataError(f"{path} has no {missing[0]!r} key (its keys: {found or 'none'})")
    return [obj[k] for k in keys]


def _check_batch(path: Path, obj, name: str):
    """One batch file holds (N, 3072) uint8 rows (or (N, 3, 32, 32), which torchvision reads alike)
    and N integer labels in range."""
    label_key = "labels" if name == "cifar10" or (isinstance(obj, dict) and "labels" in obj) else "fine_labels"
    data, labels = _entries(path, obj, ("data", label_key))  # torchvision's choice of label key
    layout = "CIFAR stores one image per row: 3072 uint8 values (3x32x32, channels first), shape (N, 3072)"
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: 'data' is a {type(data).__name__}, not a numpy array; {layout}")
    if data.ndim < 1 or tuple(data.shape[1:]) not in ((PIXELS,), (3, 32, 32)):
        raise DataError(f"{path}: 'data' has shape {tuple(data.shape)}; {layout}")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' holds {data.dtype}, not uint8 pixels (0-255); {layout}")
    problem = _labels_problem(labels, len(data), name, label_key)
    if problem:
        raise DataError(f"{path}: {problem}")


def _labels_problem(labels, images: int, name: str, key: str = "labels") -> str | None:
    """What is wrong with the labels of ``images`` images of CIFAR ``name``, or None."""
    try:
        y = np.asarray(labels)
    except ValueError as e:  # a ragged list
        return f"{key!r} is not a list of integers ({_first_line(e)})"
    if y.ndim != 1 or (len(y) and y.dtype.kind not in "iu"):
        return f"{key!r} is not a list of integers (found {y.dtype} of shape {y.shape})"
    if len(y) != images:
        return f"{images} images but {len(y)} labels"
    classes = CIFAR_CLASSES[name]
    outside = (y < 0) | (y >= classes)
    if outside.any():
        i = int(np.argmax(outside))
        return f"label {y[i]} (image {i}) is outside 0-{classes - 1}: {name} has {classes} classes"
    return None


def _names_problem(names, key: str, name: str) -> str | None:
    """What is wrong with the class names read from the meta file, or None."""
    classes = CIFAR_CLASSES[name]
    if not isinstance(names, (list, tuple)) or len(names) != classes:
        count = f"{len(names)} entries" if isinstance(names, (list, tuple)) else f"a {type(names).__name__}"
        return f"{key!r} holds {count}; {name} has {classes} class names"
    if not all(isinstance(n, str) for n in names):
        kind = next(type(n).__name__ for n in names if not isinstance(n, str))
        return f"{key!r} holds {kind} names ({names[0]!r}, ...); torchvision reads str names: pickle them as str"
    return None


def _cifar_files(name: str, root: Path):
    """(folder, batch file names, meta file name, meta key) of CIFAR ``name`` under ``root``;
    DataError naming what is missing."""
    cls = _cifar_class(name)
    folder = root / cls.base_folder
    if not folder.is_dir():
        raise DataError(f"{root} has no {cls.base_folder} folder (pass --download to fetch {name})")
    batches = [f for f, _ in cls.train_list + cls.test_list]
    missing = [f for f in [*batches, cls.meta["filename"]] if not (folder / f).exists()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)} (pass --download to fetch {name})")
    return folder, batches, cls.meta["filename"], cls.meta["key"]


def check_cifar_files(name: str, root: Path):
    """Unpickles and checks each file of CIFAR ``name`` under ``root`` on its own, as torchvision
    reads it. Raises DataError naming the first file that is missing or wrong."""
    folder, batches, meta, key = _cifar_files(name, root)
    for f in batches:
        _check_batch(folder / f, _unpickle(folder / f), name)
    (names,) = _entries(folder / meta, _unpickle(folder / meta), (key,))
    problem = _names_problem(names, key, name)
    if problem:
        raise DataError(f"{folder / meta}: {problem}")


def _loaded_problem(ds, name: str) -> str | None:
    """What is wrong with what torchvision read (one split), or None."""
    x = ds.data
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        return f"images of {getattr(x, 'dtype', type(x).__name__)}, not uint8"
    return _labels_problem(ds.targets, len(x), name) or _names_problem(ds.classes, "classes", name)


def load_cifar(name: str, data_dir, device, download: bool = False, seed: int = 0,
               val_fraction: float = 0.1) -> DataBundle:
    if data_dir is None:
        raise DataError(f"--data-dir is required for {name}")
    root = Path(data_dir).expanduser()
    if not root.is_dir() and not download:
        raise DataError(f"data directory {root} does not exist (pass --download to fetch {name})")
    cls = _cifar_class(name)
    if download:
        try:
            cls.fetch(str(root))
        except RuntimeError as e:  # torchvision: the archive's checksum does not match
            raise DataError(f"downloading {name} to {root} failed: {_first_line(e)}") from None
    folder = _cifar_files(name, root)[0]
    try:
        train = cls(str(root), train=True)
        test = cls(str(root), train=False)
        problem = _loaded_problem(train, name) or _loaded_problem(test, name)
    except Exception as e:  # KeyError('data'), UnpicklingError, ValueError from a reshape...: no file named
        problem = f"{type(e).__name__}: {_first_line(e)}"
    if problem:
        check_cifar_files(name, root)  # names the file at fault and what is wrong with it
        raise DataError(f"torchvision cannot read {name} in {folder}: {problem}")  # no single file at fault
    dev = torch.device(device)

    def tensors(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 32, 32)
        return x, torch.tensor(ds.targets, dtype=torch.long)

    x, y = tensors(train)
    keep, val = _stratified_split(y, (1 - val_fraction, val_fraction), seed)
    xt, yt = tensors(test)
    if len(xt) == 0:
        test_files = ", ".join(f for f, _ in cls.test_list)
        raise DataError(f"{folder}: {test_files} holds no images; the study reports on the test split")
    if len(val) == 0:
        raise DataError(f"{folder}: {len(x)} training images leave the validation split ({val_fraction:.0%} "
                        "of each class) empty; the study needs at least one (a class of 5 images gives one)")
    return DataBundle(name, CIFAR_CLASSES[name], list(train.classes), x[keep].to(dev), y[keep].to(dev),
                      x[val].to(dev), y[val].to(dev), xt.to(dev), yt.to(dev), augment=True)


def load_data(name: str, device, data_dir=None, download=False, seed=0) -> DataBundle:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits(device, seed)
    return load_cifar(name, data_dir, device, download, seed)
