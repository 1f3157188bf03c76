"""The language-model study (``fastkd distill --task lm``): the causal model, the text and its split,
the sparse teachers' rows, and the command end to end on a tiny corpus written here."""
import json
import math
import random
import shutil

import pytest
import torch

from fastkd.study.cli import main
from fastkd.study.lm import sampled_logprobs, teacher_rows
from fastkd.study.lm_data import EOT, LMData, TextError, read_corpus, split_blocks, train_tokenizer
from fastkd.study.lm_models import build_lm, parse_lm_model


def tiny_corpus(path, chars=6000, seed=0):
    """Text with structure a one-layer model can learn: sentences from a small random grammar."""
    rng = random.Random(seed)
    subjects, verbs, objects = ["the cat", "a dog", "my friend", "the teacher", "one student"], \
        ["sees", "likes", "finds", "reads", "writes"], ["the book", "a letter", "the mat", "some code", "a tree"]
    out = []
    while sum(map(len, out)) < chars:
        out.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n")
    path.write_text("".join(out))
    return path


@pytest.mark.parametrize("later", [1, 7, 11], ids=["second", "middle", "last"])
def test_a_tokens_outputs_do_not_depend_on_later_tokens(later):
    torch.manual_seed(later)
    model = build_lm("gpt-2x64", vocab=97, max_len=12).eval()  # two heads of 32
    x = torch.randint(0, 97, (3, 12))
    y = x.clone()
    y[:, later] = (y[:, later] + 1 + torch.randint(0, 96, (3,))) % 97  # a different token at `later`
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :later], b[:, :later], rtol=0, atol=0)  # earlier positions: untouched
    assert (a[:, later:] - b[:, later:]).abs().amax(-1).min() > 0  # from `later` on each position sees it
    torch.testing.assert_close(a, model.head(model.hidden(x)))  # forward = head(hidden): the losses' inputs


@pytest.mark.parametrize("name,message", [("resnet18", "gpt-<layers>x<width>"), ("gpt-0x64", "gpt-<layers>x<width>"),
                                          ("gpt-2x48", "multiple of 32")])
def test_model_names_are_checked(name, message):
    with pytest.raises(ValueError, match=message):
        parse_lm_model(name)
    assert parse_lm_model("gpt-3x96") == (3, 96) and parse_lm_model("gpt-1x16") == (1, 16)


def test_tokenizer_is_deterministic_and_lossless(tmp_path):
    texts, _ = read_corpus([str(tiny_corpus(tmp_path / "a.txt"))], 10_000)
    tok = train_tokenizer(texts, 300)
    assert tok.to_str() == train_tokenizer(texts, 300).to_str()
    text = "the cat writes ünïcode € code\n\tand tabs"  # bytes never seen in training still encode
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(EOT) is not None and tok.get_vocab_size() <= 300


def test_split_partitions_the_blocks_the_same_way_every_time(tmp_path):
    texts, _ = read_corpus([str(tiny_corpus(tmp_path / "a.txt"))], 10_000)
    tok = train_tokenizer(texts, 300)
    train, val, test = split_blocks(texts, tok, 9, "cpu")
    again = split_blocks(texts, tok, 9, "cpu")
    assert all(torch.equal(p, q) for p, q in zip((train, val, test), again))
    blocks = torch.cat([train, val, test])
    stream = [i for t in texts for i in tok.encode(t).ids + [tok.token_to_id(EOT)]]
    n = len(stream) // 10
    expect = torch.tensor(stream[:10 * n]).view(n, 10)  # the stream cut into blocks, each block once
    assert blocks.shape == expect.shape and sorted(map(tuple, blocks.tolist())) == sorted(map(tuple, expect.tolist()))
    assert len(train) == round(0.8 * n) and len(val) == round(0.1 * n)
    with pytest.raises(TextError, match="fewer than 3 blocks"):
        split_blocks(["a b"], tok, 9, "cpu")


def test_corpus_errors_name_the_file(tmp_path):
    with pytest.raises(TextError, match="missing.txt: no such file"):
        read_corpus([str(tmp_path / "missing.txt")], 100)
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(TextError, match="bin.txt: not UTF-8"):
        read_corpus([str(tmp_path / "bin.txt")], 100)
    texts, info = read_corpus(None, 5000)  # the standard library: every Python has argparse.py
    import sysconfig
    from pathlib import Path

    argparse_py = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    assert info["files"] == ["argparse.py"] and texts == [argparse_py[:5000]]


def test_sampled_rows_are_log_count_over_s_and_fixed_per_seed():
    ids = torch.tensor([[3, 1, -1, -1], [2, 0, 1, 4]], dtype=torch.int32)
    counts = torch.tensor([[3, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.int32)
    lp = sampled_logprobs(ids, counts, 4)
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.75), math.log(0.25), 0, 0], [math.log(0.25)] * 4]))

    from fastkd.study.config import StudyConfig

    torch.manual_seed(0)
    blocks = torch.randint(0, 40, (70, 9))  # more than one evaluation batch of blocks
    data = LMData(blocks, blocks[:2], blocks[:2], 40, 8, {})
    teacher = build_lm("gpt-1x16", 40, 8)
    rows = [teacher_rows(teacher, data, StudyConfig(task="lm", sparse_k=[2, 5], seed=s).resolved()) for s in (0, 0, 1)]
    for s in (2, 5):
        assert torch.equal(rows[0][s][0], rows[1][s][0]) and torch.equal(rows[0][s][1], rows[1][s][1])
        assert not torch.equal(rows[0][s][0], rows[2][s][0])  # another seed, other draws
        assert rows[0][s][0].shape == (70, 8, s)
    ids, logprobs = rows[0]["top"]
    expect = teacher(blocks[:, :-1]).float().log_softmax(-1).topk(5, -1)
    torch.testing.assert_close(logprobs, expect.values)


LM_ARGS = ["--task", "lm", "--teacher", "gpt-1x32", "--student", "gpt-1x16", "--seq-len", "16", "--vocab-size",
           "300", "--sparse-k", "2", "--epochs", "2", "--teacher-epochs", "4", "--batch-size", "8", "--lr", "1e-2",
           "--backend", "torch"]  # (the suite runs Triton through its interpreter: far slower on a CPU)
KEYS = ["teacher", "student", "distilled", "distilled-top2-bucket", "distilled-top2-renormalize",
        "distilled-top2-lumped", "distilled-sampled2"]


def run_cli(capsys, *args):
    code = main(["distill", "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("text") / "tiny.txt")


def test_cli_end_to_end_on_a_tiny_corpus(capsys, tiny_text, tmp_path):
    out = tmp_path / "runs"
    tiny_text = shutil.copy(tiny_text, tmp_path / "tiny.txt")  # this run's own copy: it is changed at the end
    code, stdout, err = run_cli(capsys, *LM_ARGS, "--text", str(tiny_text), "--out-dir", str(out), "--name", "r")
    assert code == 0, err
    folder = out / "r"
    for name in ("report.md", "report.json", "metrics.jsonl", "config.json", "tokenizer.json", "teacher.pt", "sparse.png"):
        assert (folder / name).stat().st_size > 0, name
    report = json.loads((folder / "report.json").read_text())
    assert list(report["results"]) == KEYS and "top-2, lumped tail" in stdout
    vocab = report["dataset"]["vocab"]
    assert 256 < vocab <= 300 and report["dataset"]["files"] == [str(tiny_text)]
    for key, r in report["results"].items():
        for metric in ("accuracy", "ece", "ece_after_scaling", "agreement", "mce"):
            assert 0.0 <= r[metric] <= 1.0, (key, metric)
        assert math.isclose(r["perplexity"], math.exp(r["nll"]), rel_tol=1e-9) and r["perplexity"] < vocab, key
        assert r["kl_teacher"] >= -1e-6 and r["fitted_temperature"] > 0 and r["tokens_per_s"] > 0, key
        assert r["peak_memory_bytes"] is None  # CPU
        assert sum(b["count"] for b in report["bins"][key]) == report["dataset"]["tokens"]["test"]
    teacher = report["results"]["teacher"]
    assert teacher["agreement"] == 1.0 and teacher["kl_teacher"] == 0.0
    assert teacher["perplexity"] < 20  # the grammar is learnable: far below the vocabulary
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines] == ["teacher"] * 4 + [k for k in KEYS[1:] for _ in range(2)]

    # --resume continues (here: every stage finished) with the same numbers; a new run is refused
    code, _, err = run_cli(capsys, "--task", "lm", "--resume", "--out-dir", str(out), "--name", "r")
    assert code == 0, err
    again = json.loads((folder / "report.json").read_text())
    for key in KEYS:
        for metric in ("nll", "ece", "ece_after_scaling", "agreement", "kl_teacher", "fitted_temperature"):
            assert again["results"][key][metric] == report["results"][key][metric], (key, metric)
    # a run cut short in its last student: --resume retrains that one from its start, to the same numbers
    (folder / "distilled-sampled2.pt").unlink()
    (folder / "report.json").unlink()
    code, _, err = run_cli(capsys, "--task", "lm", "--resume", "--out-dir", str(out), "--name", "r")
    assert code == 0, err
    third = json.loads((folder / "report.json").read_text())["results"]
    for key in KEYS:
        for metric in ("nll", "ece", "agreement", "kl_teacher"):
            assert third[key][metric] == report["results"][key][metric], (key, metric)
    code, _, err = run_cli(capsys, *LM_ARGS, "--text", str(tiny_text), "--out-dir", str(out), "--name", "r")
    assert code == 2 and "holds an earlier run" in err
    code, _, err = run_cli(capsys, "--task", "lm", "--resume", "--seq-len", "8", "--out-dir", str(out), "--name", "r")
    assert code == 2 and "was run with --seq-len = 16, not 8" in err
    # the same path with other text: refused, not trained on
    (folder / "distilled-sampled2.pt").unlink()
    tiny_text.write_text(tiny_text.read_text() + "one more line\n")
    code, _, err = run_cli(capsys, "--task", "lm", "--resume", "--out-dir", str(out), "--name", "r")
    assert code == 2 and "the text changed since" in err and not (folder / "distilled-sampled2.pt").exists()


def test_cli_seeds_summary_pairs_each_student_with_the_dense_one(capsys, tiny_text, tmp_path):
    args = [*LM_ARGS, "--text", str(tiny_text), "--out-dir", str(tmp_path), "--epochs", "1", "--teacher-epochs", "1"]
    code, stdout, err = run_cli(capsys, *args, "--seeds", "0-1")
    assert code == 0, err
    summary = json.loads((tmp_path / "lm-seeds0-1" / "report.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["per_seed"]) == {"0", "1"}
    d = summary["metrics"]["ece"]["vs_distilled"]["distilled-sampled2"]
    assert d["n"] == 2 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert set(summary["metrics"]["ece"]["vs_distilled"]) == set(KEYS[1:]) - {"distilled"}
    assert (tmp_path / "lm-seeds0-1" / "summary.png").stat().st_size > 0
    assert "Δ ECE" in stdout and "sampled, S = 2" in (tmp_path / "lm-seeds0-1" / "report.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--task", "lm", "--teacher", "resnet18"], "unknown language model 'resnet18'"),
    (["--task", "lm", "--sparse-k", "0"], "--sparse-k values must be >= 1"),
    (["--task", "lm", "--dataset", "cifar10"], "--dataset is not an option of --task lm"),
    (["--task", "lm", "--text", "/nonexistent/a.txt"], "--text /nonexistent/a.txt: no such file"),
    (["--text", "a.txt"], "--text belongs to the language-model study: add --task lm"),
    (["--task", "poem"], "unknown task 'poem'; choose from classify, lm"),
])
def test_cli_bad_arguments_end_in_one_line(capsys, args, message, tmp_path):
    code, _, err = run_cli(capsys, "--out-dir", str(tmp_path), *args)
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
