"""``fastkd distill``: the distillation study from the command line (and ``fastkd cache-teacher``).

Bad arguments end with one line on stderr and exit status 2, no traceback; a command run without
the ``study`` extra installed ends with one line naming it, exit status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

from .. import __version__
from .config import StudyConfig, check_device, resolve_device, saved_settings, with_saved_settings

# fastkd[study] by import name (the study runs without tensorboard). What every run of a command
# needs is checked before it starts (the report's packages among them, not to fail after training);
# the rest is named when its import fails (torchvision, when CIFAR data or models load).
STUDY_PACKAGES = {"sklearn": "scikit-learn", "scipy": "scipy", "tqdm": "tqdm", "matplotlib": "matplotlib",
                  "torchvision": "torchvision", "tokenizers": "tokenizers"}
EVERY_RUN = {"distill": ("sklearn", "scipy", "tqdm", "matplotlib"), "cache-teacher": ("tqdm",)}
# what Ctrl-C leaves behind, per command
INTERRUPTED = {"distill": "each finished epoch is checkpointed: the same command with --resume continues the run",
               "cache-teacher": "no cache was written (the partial folder is removed); run the command again"}


def _add_config_arguments(parser: argparse.ArgumentParser, defaults: bool = True):
    """One option per StudyConfig field: booleans become flags (``--no-x`` for one on by default, its
    help the field's "off" text), the rest take a typed value; a default that is a value is named in
    the help (one that depends on other settings is described by the field's own help). Without
    ``defaults`` an option not given leaves no attribute (what :func:`given_options` reads)."""
    for f in dataclasses.fields(StudyConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type != "bool" and f.default is not None:
            help_ += f" (default: {f.default})"
        default = f.default if defaults else argparse.SUPPRESS
        if f.type == "bool":
            if f.default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, default=default,
                                    action="store_false", help=f.metadata["off"])
            else:
                parser.add_argument(flag, dest=f.name, default=default, action="store_true", help=help_)
            continue
        if f.type.startswith("list["):
            parser.add_argument(flag, dest=f.name, type=f.metadata.get("type", int), nargs="+", default=default,
                                metavar=f.metadata.get("metavar"), help=help_)
            continue
        kind = int if f.type.startswith("int") else float if f.type.startswith("float") else str
        parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_)


def given_options(argv) -> set[str]:
    """The StudyConfig fields set on ``fastkd distill``'s command line (the rest are defaults)."""
    return set(vars(build_parser(defaults=False).parse_args(argv))) - {"command", "seeds"}


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd", description="fast knowledge distillation")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    distill = sub.add_parser("distill", help="train a teacher, a student alone and a distilled "
                             "student; report accuracy and calibration")
    _add_config_arguments(distill, defaults)
    distill.add_argument("--seeds", help="run the study once per seed (0-9, 0,3,7 or 0-4,8; replaces --seed) "
                         "and summarise: mean ± std, paired differences with 95%% intervals, one figure")
    from .cache_teacher import add_parser as add_cache_teacher

    add_cache_teacher(sub)
    return parser


def validate(cfg: StudyConfig):
    """Rejects bad settings before any data is read or model trained."""
    from .data import DATASETS
    from .models import MODELS
    from .policies import POLICIES
    from ..backends import BACKENDS
    from ..loss import DIVERGENCES

    def choice(value, name, choices):
        if value is not None and value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")

    choice(cfg.task, "task", ("classify", "lm"))
    if cfg.task == "lm":  # its own models, data and options: fastkd/study/lm.py
        from .lm import validate_lm

        validate_lm(cfg)
    else:
        choice(cfg.dataset, "dataset", DATASETS)
        choice(cfg.teacher, "teacher model", MODELS)
        choice(cfg.student, "student model", MODELS)
        for name in ("text", "corpus_chars", "vocab_size", "seq_len", "sparse_k"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} belongs to the language-model study: add --task lm")
    choice(cfg.divergence, "divergence", DIVERGENCES)
    choice(cfg.policy, "policy", POLICIES)
    choice(cfg.backend, "backend", BACKENDS)
    if not cfg.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if not 0 <= cfg.alpha <= 1:
        raise ValueError(f"--alpha must lie in [0, 1], got {cfg.alpha}")
    for name in ("epochs", "teacher_epochs"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if (cfg.batch_size is not None and cfg.batch_size < 1) or cfg.num_bins < 1 or cfg.log_interval < 1:
        raise ValueError("--batch-size, --num-bins and --log-interval must be >= 1")
    _validate_teacher_cache(cfg)
    check_device(cfg.device)
    _check_backend(cfg.backend, resolve_device(cfg.device))


def _check_backend(backend: str | None, device: str):
    """A backend asked for by name runs on the run's device (else it would fail after the teacher trained)."""
    if backend in (None, "auto"):
        return
    from .. import available_backends

    info = {b.name: b for b in available_backends(device)}[backend]
    if not info.available:
        raise ValueError(f"--backend {backend} cannot run on {device}: {info.reason}")


def _validate_teacher_cache(cfg: StudyConfig):
    from ..sparse import TAILS

    if cfg.teacher_cache_tail not in TAILS:
        raise ValueError(f"unknown --teacher-cache-tail {cfg.teacher_cache_tail!r}; choose from {', '.join(TAILS)}")
    if not cfg.teacher_cache:
        return
    ks = [v for v in cfg.teacher_cache if isinstance(v, int)]
    if ks and min(ks) < 1:
        raise ValueError(f"--teacher-cache values must be >= 1 (entries per row) or cache folders, got {min(ks)}")
    if cfg.divergence != "kl":
        raise ValueError(f"--teacher-cache distils with sparse_kd_loss, which takes --divergence kl only, "
                         f"got {cfg.divergence!r}")


def missing_study_packages(command: str) -> list[str]:
    """The packages of fastkd[study] that every run of ``command`` needs and this environment lacks."""
    return [STUDY_PACKAGES[m] for m in EVERY_RUN[command] if importlib.util.find_spec(m) is None]


def _no_study_extra(command: str, packages) -> int:
    print(f'fastkd: error: {command} needs {", ".join(packages)}, not installed: '
          'pip install "fastkd[study]"', file=sys.stderr)
    return 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_study_packages(args.command)
    if missing:
        return _no_study_extra(args.command, missing)
    try:
        if args.command == "cache-teacher":
            from .cache_teacher import run

            return run(args)
        return distill(args, given_options(argv) if args.resume else set())
    except KeyboardInterrupt:  # Ctrl-C: one line saying what is kept, no traceback
        print(f"fastkd: interrupted; {INTERRUPTED[args.command]}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in STUDY_PACKAGES:
            raise
        return _no_study_extra(args.command, [STUDY_PACKAGES[top]])


def distill(args, given=frozenset()) -> int:
    """``fastkd distill``; ``given``: the settings named on the command line (what --resume keeps)."""
    cfg = StudyConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "seeds")})
    if cfg.task == "lm":  # the language-model study: its own run, report and seeds summary
        from .lm import distill_lm

        return distill_lm(cfg, args.seeds, validate, given)
    if args.seeds is not None:  # several seeds and their summary: fastkd/study/seeds.py
        from .seeds import distill_seeds

        return distill_seeds(cfg, args.seeds, validate, given)
    try:
        if cfg.resume:  # the settings not given are those the run was started with
            saved = saved_settings(Path(cfg.out_dir) / cfg.resolved().name)
            cfg = with_saved_settings(cfg, saved, given) if saved is not None else cfg
        validate(cfg)
        from .report import results_table
        from .run import run_study

        from . import torchrun

        report = run_study(cfg)
    except (ValueError, OSError) as e:  # DataError is a ValueError; a bad path an OSError
        print(f"fastkd: error: {e}", file=sys.stderr)
        return 2
    main_rank = torchrun.is_main()
    torchrun.shutdown()
    if not main_rank:  # under torchrun only rank 0 reports
        return 0
    out = f"{report['config']['out_dir']}/{report['config']['name']}"
    print(results_table(report["results"]))
    print(f"\npolicy {report['policy']['name']}; {report['timing']['seconds']:.1f} s on "
          f"{report['timing']['device']}; report, diagrams and curves in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
