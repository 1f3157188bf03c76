"""The language-model study's text: where it comes from, its tokenizer, its split.

Default corpus: Python's own standard library, the ``.py`` files of :data:`STDLIB_FILES` (in that
order, from ``sysconfig.get_paths()["stdlib"]``; a file this Python lacks is skipped), read whole
until ``--corpus-chars`` characters, the last file cut there. Every machine with Python has them, so
the study needs no download; the files differ between Python versions, so the report records the
version, the files and the corpus's sha256. ``--text PATH ...`` takes any UTF-8 text files instead
(in the order given, under the same character budget).

Tokenizer: byte-level BPE (HF ``tokenizers``), trained on the corpus at the start of a run with a
vocabulary of ``--vocab-size`` (fewer on a corpus too small to fill it) and one special token,
``<|endoftext|>``, which ends every file; it is saved in the run folder (tokenizer.json) and a
resumed run reads it back from there. A byte-level vocabulary encodes any text, so no token is unknown.

Split: the files' tokens, end to end, cut into blocks of ``seq_len + 1`` tokens (a block's first
``seq_len`` tokens are the input, its last ``seq_len`` the targets; the stream's remainder is
dropped); the blocks are shuffled by a generator seeded with 0, the same for every seed and machine,
and the first 80% train, the next 10% validate (the T* fit and the per-epoch metrics), the last 10%
test. Blocks of one file can fall on both sides: the split measures fit to this corpus's text, not
transfer to unseen files.
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

# A fixed, ordered subset of the standard library: plain modules present from Python 3.9 on, varied
# in style (parsers, data structures, text, numbers, concurrency, typing); about 1.6 MB in 3.11, of which
# the default 300,000 characters take the first 10 files
STDLIB_FILES = ("argparse", "dataclasses", "functools", "textwrap", "string", "shlex", "fractions", "heapq",
                "bisect", "enum", "statistics", "random", "csv", "difflib", "pprint", "queue", "sched",
                "calendar", "contextlib", "copy", "fnmatch", "glob", "numbers", "operator", "tokenize", "types",
                "uuid", "weakref", "shutil", "threading", "inspect", "typing")
EOT = "<|endoftext|>"
SPLIT_SEED = 0
FRACTIONS = (0.8, 0.1)  # train, validation; the rest is test


class TextError(ValueError):
    """Text the study cannot use (the CLI prints it as one line)."""


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in (root / f"{name}.py" for name in STDLIB_FILES) if p.is_file()]


def read_corpus(paths: list[str] | None, max_chars: int) -> tuple[list[str], dict]:
    """The corpus as one string per file (cut at ``max_chars`` characters in all) and what the
    report says about it: its source, files, characters and sha256."""
    if paths:
        files = [Path(p) for p in paths]
        source = "text files (--text)"
    else:
        files = stdlib_files()
        source = f"Python {sys.version.split()[0]} standard library ({sysconfig.get_paths()['stdlib']})"
        if not files:
            raise TextError(f"no standard-library source found in {sysconfig.get_paths()['stdlib']}; "
                            "give text files with --text")
    texts, used, left = [], [], max_chars
    for f in files:
        if left <= 0:
            break
        try:
            text = f.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TextError(f"--text {f}: no such file") from None
        except UnicodeDecodeError as e:
            raise TextError(f"--text {f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise TextError(f"--text {f}: cannot read it ({e.strerror})") from None
        if text:
            texts.append(text[:left])
            used.append(f.name if not paths else str(f))
            left -= len(texts[-1])
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return texts, {"source": source, "files": used, "chars": sum(map(len, texts)), "sha256": digest}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic: the same texts give the same merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type
        raise TextError(f"cannot read tokenizer {path}: {e}") from None


@dataclass
class LMData:
    """Blocks of ``seq_len + 1`` token ids per split (int64, on the device), and the vocabulary."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    vocab: int
    seq_len: int
    info: dict

    def tokens(self, split: str) -> int:
        """The tokens predicted in a split (its targets)."""
        return getattr(self, split).shape[0] * self.seq_len


def split_blocks(texts: list[str], tokenizer, seq_len: int, device) -> tuple[torch.Tensor, ...]:
    """(train, val, test) blocks of ``seq_len + 1`` tokens, as described in the module docstring."""
    eot = tokenizer.token_to_id(EOT)
    stream = []
    for enc in tokenizer.encode_batch(texts):
        stream += enc.ids + [eot]
    n = len(stream) // (seq_len + 1)
    if n < 3:
        raise TextError(f"the corpus gives {len(stream)} tokens, fewer than 3 blocks of --seq-len + 1 = "
                        f"{seq_len + 1} (one each for train, validation and test): give more text or a shorter --seq-len")
    blocks = torch.tensor(stream[:n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)
    blocks = blocks[torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))]
    n_val = max(1, round(FRACTIONS[1] * n))
    n_test = max(1, n - max(1, round(FRACTIONS[0] * n)) - n_val)
    n_train = n - n_val - n_test
    return tuple(b.to(device) for b in blocks.split([n_train, n_val, n_test]))


def load_lm_data(paths, max_chars: int, vocab_size: int, seq_len: int, device, tokenizer_path: Path | None = None):
    """(the corpus split into blocks, its tokenizer): the tokenizer read from ``tokenizer_path`` when
    given (a resumed run's), else trained on the corpus (the caller saves it)."""
    texts, info = read_corpus(paths, max_chars)
    tok = load_tokenizer(tokenizer_path) if tokenizer_path is not None else train_tokenizer(texts, vocab_size)
    train, val, test = split_blocks(texts, tok, seq_len, device)
    vocab = tok.get_vocab_size()
    info = {**info, "tokenizer": "byte-level BPE (HF tokenizers)", "vocab": vocab, "seq_len": seq_len,
            "blocks": {"train": len(train), "val": len(val), "test": len(test)},
            "tokens": {s: len(b) * seq_len for s, b in (("train", train), ("val", val), ("test", test))},
            "chars_per_token": info["chars"] / max(1, (len(train) + len(val) + len(test)) * (seq_len + 1))}
    return LMData(train, val, test, vocab, seq_len, info), tok
