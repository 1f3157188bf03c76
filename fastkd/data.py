"""Data sets for the study, kept on the training device as whole tensors.

``digits``: scikit-learn's bundled 8x8 digits (1,797 images, nothing to download), a fixed
stratified train / validation / test split. ``cifar10`` / ``cifar100``: torchvision's dataset
classes read the standard python-pickle batches from ``data_dir`` (downloaded only with
``download=True``); images stay uint8 on the device and are normalised and augmented there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

DATASETS = ("digits", "cifar10", "cifar100")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataError(ValueError):
    """A data set that cannot be loaded as asked (the CLI prints it as one line)."""


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


def load_digits(device, seed: int = 0) -> DataBundle:
    from sklearn.datasets import load_digits as sk_digits

    ds = sk_digits()
    x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target, dtype=torch.long)
    train, val, test = _stratified_split(y, (0.6, 0.2, 0.2), seed)
    dev = torch.device(device)
    return DataBundle("digits", 10, [str(c) for c in range(10)], x[train].to(dev), y[train].to(dev),
                      x[val].to(dev), y[val].to(dev), x[test].to(dev), y[test].to(dev), augment=False)


def _cifar_class(name):
    from torchvision import datasets

    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    class Cifar(base):
        # torchvision checks the MD5 of each batch file; with None it checks that the file exists,
        # so subsets and locally written fixtures load too (a download still verifies its archive).
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return Cifar


def load_cifar(name: str, data_dir, device, download: bool = False, seed: int = 0,
               val_fraction: float = 0.1) -> DataBundle:
    if data_dir is None:
        raise DataError(f"--data-dir is required for {name}")
    root = Path(data_dir)
    if not root.is_dir() and not download:
        raise DataError(f"data directory {root} does not exist (pass --download to fetch {name})")
    cls = _cifar_class(name)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        raise DataError(f"{name} not found under {root} ({e}); pass --download to fetch it") from None
    dev = torch.device(device)

    def tensors(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 32, 32)
        return x, torch.tensor(ds.targets, dtype=torch.long)

    x, y = tensors(train)
    keep, val = _stratified_split(y, (1 - val_fraction, val_fraction), seed)
    xt, yt = tensors(test)
    return DataBundle(name, len(train.classes), list(train.classes), x[keep].to(dev), y[keep].to(dev),
                      x[val].to(dev), y[val].to(dev), xt.to(dev), yt.to(dev), augment=True)


def load_data(name: str, device, data_dir=None, download=False, seed=0) -> DataBundle:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits(device, seed)
    return load_cifar(name, data_dir, device, download, seed)
