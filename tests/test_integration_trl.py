"""fastkd in TRL: ``chunked_divergence_loss`` equals TRL 1.16's ``_chunked_divergence_loss`` (value,
entropy, count and student gradients; forward KL, reverse KL, JSD; T = 1, 2; masks, logit scales,
softcaps, num_items), ``FastKDDistillationTrainer._compute_loss`` equals TRL's on tiny random models
whose configs carry those transforms, and the trainer trains two steps offline on CPU."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import BACKENDS

pytest.importorskip("trl")

import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from trl import DistillationConfig  # noqa: E402
from trl.trainer import distillation_trainer as trl_dt  # noqa: E402

from fastkd.integrations import trl as fastkd_trl  # noqa: E402
from fastkd.integrations.trl import (  # noqa: E402
    FastKDDistillationTrainer, check_trl_version, chunked_divergence_loss, trl_divergence)

TRL_LOSS = trl_dt._chunked_divergence_loss
VOCAB = 40


def test_import_fastkd_does_not_import_the_frameworks():
    code = ("import sys, fastkd, fastkd.integrations; "
            "print(sorted({'trl', 'transformers', 'torchdistill'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_same_signature_as_trl_and_beta_mapping():
    fastkd_trl._check_trl_seam()  # raises when TRL's function takes other arguments
    assert trl_divergence(0.0) == ("kl", 0.5) and trl_divergence(1.0) == ("reverse_kl", 0.5)
    assert trl_divergence(0.3) == ("jsd", 0.3)  # M = 0.3 p_t + 0.7 p_s in both: the parity tests check it


def test_trl_version_range():
    check_trl_version()  # the installed one
    for version in fastkd_trl.TRL_TESTED:
        check_trl_version(version)
    with pytest.raises(RuntimeError, match=r"supports TRL >= 1\.15 \(tested: 1\.15\.0, 1\.16\.0\); TRL 1\.14\.2 is "):
        check_trl_version("1.14.2")


# --- the loss function ------------------------------------------------------------------------

def loss_inputs(gen, b=3, k=7, h_s=16, h_t=24, v=VOCAB, bias=False, spread=3.0):
    hs = torch.randn(b, k, h_s, generator=gen)
    ht = torch.randn(b, k, h_t, generator=gen)
    ws = spread * torch.randn(v, h_s, generator=gen) / h_s**0.5
    wt = spread * torch.randn(v, h_t, generator=gen) / h_t**0.5
    mask = torch.ones(b, k, dtype=torch.long)
    mask[0, 4:] = 0  # padded completions
    mask[2, 1:] = 0
    bs = torch.randn(v, generator=gen) if bias else None
    bt = torch.randn(v, generator=gen) if bias else None
    return hs, ht, ws, wt, mask, bs, bt


def run_loss(fn, inputs, g, **kwargs):
    hs, ht, ws, wt, mask, bs, bt = (x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    leaves = [x.requires_grad_() for x in (hs, ws, bs) if x is not None]
    loss, entropy_sum, n_valid = fn(hs, ht, ws, wt, mask, student_lm_head_bias=bs, teacher_lm_head_bias=bt,
                                    **kwargs)
    grads = torch.autograd.grad(loss, leaves, g)
    return loss.detach(), entropy_sum, n_valid, grads


def assert_same(ours, ref):
    """Equal to fp32 rounding: each side's loss is within ~5e-7 of a float64 evaluation, and each
    gradient entry within ~3e-7 of the largest entry (both measured, TRL's own errors the same size)."""
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-6, atol=1e-7)  # loss
    torch.testing.assert_close(ours[1], ref[1], rtol=2e-6, atol=1e-6)  # entropy sum (nats, over the tokens)
    assert ours[2].item() == ref[2].item()  # counted tokens
    for a, b in zip(ours[3], ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 + 1e-6 * b.abs().max().item())


DIVERGENCES = [pytest.param(0.0, id="forward-kl"), pytest.param(1.0, id="reverse-kl"),
               pytest.param(0.5, id="jsd"), pytest.param(0.3, id="jsd-beta0.3")]


@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
@pytest.mark.parametrize("beta", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_equals_trl(gen, backend, beta, temperature):
    inputs = loss_inputs(gen, bias=beta == 0.5)
    g = torch.rand((), generator=gen) + 0.5
    kwargs = dict(beta=beta, temperature=temperature)
    assert_same(run_loss(chunked_divergence_loss, inputs, g, backend=backend, **kwargs),
                run_loss(TRL_LOSS, inputs, g, **kwargs))


TRANSFORMS = [  # TRL's names: student_/teacher_logit_scale, student_/teacher_final_logit_softcapping; each with
    # another divergence (the chain rule through the transform is the same for all three)
    pytest.param(dict(student_logit_scale=0.5, teacher_logit_scale=2.0), 1.0, id="logit-scales-reverse-kl"),
    pytest.param(dict(student_final_logit_softcapping=2.0, teacher_final_logit_softcapping=5.0), 0.0,
                 id="softcaps-forward-kl"),
    pytest.param(dict(student_logit_scale=1.5, student_final_logit_softcapping=2.5, teacher_logit_scale=0.25), 0.3,
                 id="scale-then-softcap-jsd-beta0.3"),
]


@pytest.mark.parametrize("transform, beta", TRANSFORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_equals_trl_with_logit_transforms(gen, backend, transform, beta):
    inputs = loss_inputs(gen, spread=6.0)  # logits well inside tanh's curved part
    g = torch.rand((), generator=gen) + 0.5
    kwargs = dict(beta=beta, temperature=2.0, **transform)
    assert_same(run_loss(chunked_divergence_loss, inputs, g, backend=backend, **kwargs),
                run_loss(TRL_LOSS, inputs, g, **kwargs))


@pytest.mark.parametrize("num_items", [
    pytest.param(lambda: 29, id="int"),
    pytest.param(lambda: torch.tensor(29), id="int-tensor"),
    pytest.param(lambda: torch.tensor(29).clamp(min=1.0) / 2, id="float-tensor-as-trl"),  # compute_loss's
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_equals_trl_with_num_items(gen, backend, num_items):
    inputs = loss_inputs(gen)
    g = torch.rand((), generator=gen) + 0.5
    kwargs = dict(beta=0.5, temperature=2.0)
    assert_same(run_loss(chunked_divergence_loss, inputs, g, backend=backend, num_items_in_batch=num_items(),
                         **kwargs),
                run_loss(TRL_LOSS, inputs, g, num_items_in_batch=num_items(), **kwargs))


def test_all_masked_gives_zero_like_trl(gen):
    hs, ht, ws, wt, mask, bs, bt = loss_inputs(gen)
    mask = torch.zeros_like(mask)
    ours = chunked_divergence_loss(hs, ht, ws, wt, mask, 0.5, backend="torch")
    ref = TRL_LOSS(hs, ht, ws, wt, mask, 0.5)
    assert ours[0].item() == ref[0].item() == 0.0 and ours[1].item() == ref[1].item() == 0.0
    assert ours[2].item() == ref[2].item() == 0


# --- through the trainer, on tiny random models ----------------------------------------------

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def tiny_model(family, hidden, config, seed, vocab=VOCAB):
    """A randomly initialised one-layer causal LM; heads of unit scale so that logits reach the curved
    part of a softcap's tanh (the default initialisation gives logits of about 0.1)."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                  tie_word_embeddings=False, **config)
    if family == "Gemma2":
        common["head_dim"] = hidden // 2
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**common))
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 1.0)
    return model


def trainer_args(tmp_path, **kwargs):
    """What makes DistillationTrainer run offline on a CPU in about a second: no bf16, no gradient
    checkpointing, no reporting or saving, short completions sampled by transformers' generate."""
    return DistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False,
                              report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
                              max_completion_length=4, per_device_train_batch_size=2, **kwargs)


PROMPTS = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]})

PAIRS = [  # student (family, H, config), teacher (family, H, config), TRL beta, temperature, and what TRL
    # reads from the configs: (student scale, teacher scale, student softcap, teacher softcap)
    pytest.param(("Llama", 16, {}), ("Llama", 24, {}), 0.5, 2.0, (1.0, 1.0, None, None), id="llama-jsd-T2"),
    pytest.param(("Gemma2", 16, dict(final_logit_softcapping=3.0)), ("Gemma2", 24, dict(final_logit_softcapping=5.0)),
                 0.0, 1.0, (1.0, 1.0, 3.0, 5.0), id="gemma2-softcaps-forward-kl"),
    pytest.param(("Cohere", 16, dict(logit_scale=0.5)), ("Granite", 24, dict(logits_scaling=4.0)), 1.0, 2.0,
                 (0.5, 0.25, None, None), id="cohere-granite-logit-scales-reverse-kl"),
    pytest.param(("Granite", 16, dict(logits_scaling=0.5)), ("Gemma2", 24, dict(final_logit_softcapping=4.0)),
                 0.3, 2.0, (2.0, 1.0, None, 4.0), id="granite-gemma2-jsd-beta0.3"),
]


@pytest.mark.parametrize("student_spec, teacher_spec, beta, temperature, transforms", PAIRS)
def test_trainer_compute_loss_equals_trl(tmp_path, tokenizer, student_spec, teacher_spec, beta, temperature,
                                         transforms):
    student, teacher = tiny_model(*student_spec, seed=0), tiny_model(*teacher_spec, seed=1)
    trainer = FastKDDistillationTrainer(model=student, teacher_model=teacher, train_dataset=PROMPTS,
                                        processing_class=tokenizer, fastkd_backend="torch",
                                        args=trainer_args(tmp_path, beta=beta, temperature=temperature))
    seen = []
    loss_fn = trainer.fastkd_loss
    trainer.fastkd_loss = lambda *a, **k: seen.append(dict(k, beta=a[5])) or loss_fn(*a, **k)  # beta: positional
    gen = torch.Generator().manual_seed(0)
    inputs = {"prompt_ids": torch.randint(3, VOCAB, (3, 4), generator=gen),
              "prompt_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]),  # left padding
              "completion_ids": torch.randint(3, VOCAB, (3, 5), generator=gen),
              "completion_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])}
    outs = []
    for compute_loss in (trainer._compute_loss, lambda *a: trl_dt.DistillationTrainer._compute_loss(trainer, *a)):
        for num_items in (None, torch.tensor(9).clamp(min=1.0)):
            student.zero_grad(set_to_none=True)
            loss, entropy_sum, n_valid = compute_loss(student, inputs, num_items)
            loss.backward()
            outs.append((loss.detach(), entropy_sum, n_valid, [p.grad.clone() for p in student.parameters()]))
    assert trl_dt._chunked_divergence_loss is TRL_LOSS  # restored after each fastkd call
    names = ("student_logit_scale", "teacher_logit_scale", "student_final_logit_softcapping",
             "teacher_final_logit_softcapping")
    assert len(seen) == 2 and all(tuple(k[n] for n in names) == transforms for k in seen)
    assert all(k["beta"] == beta and k["temperature"] == temperature for k in seen)
    for ours, ref in zip(outs[:2], outs[2:]):
        assert_same(ours, ref)


@pytest.mark.filterwarnings("ignore:.is_gradient_checkpointing. is deprecated:FutureWarning")  # transformers', via TRL
def test_trainer_trains_two_steps_like_trl(tmp_path, tokenizer, monkeypatch):
    calls = []
    fused = fastkd_trl.fused_linear_kd_loss
    monkeypatch.setattr(fastkd_trl, "fused_linear_kd_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))
    histories = {}
    for name, cls, extra in (("fastkd", FastKDDistillationTrainer, dict(fastkd_backend="torch")),
                             ("trl", trl_dt.DistillationTrainer, {})):
        trainer = cls(model=tiny_model("Llama", 16, {}, seed=0), teacher_model=tiny_model("Llama", 24, {}, seed=1),
                      train_dataset=PROMPTS, processing_class=tokenizer, **extra,
                      args=trainer_args(tmp_path / name, max_steps=2, learning_rate=1e-2, beta=0.5, temperature=2.0,
                                        seed=3))
        trainer.train()
        histories[name] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(calls) == 2 and trl_dt._chunked_divergence_loss is TRL_LOSS
    assert len(histories["fastkd"]) == len(histories["trl"]) == 2
    for ours, ref in zip(histories["fastkd"], histories["trl"]):  # same seed: same samples, same steps
        assert ours["completions/mean_length"] == ref["completions/mean_length"]
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert ours["entropy"] == pytest.approx(ref["entropy"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)


# --- padded vocabularies ----------------------------------------------------------------------

@pytest.mark.parametrize("padded", ["teacher", "student"])
@pytest.mark.parametrize("beta", [pytest.param(0.0, id="forward-kl"), pytest.param(1.0, id="reverse-kl")])
def test_padded_heads_are_compared_over_the_shared_rows(gen, padded, beta):
    """Heads of 40 and 47 rows equal TRL's loss on the first 40 rows of both (TRL refuses unequal heads);
    the larger student's padding rows get no gradient."""
    hs, ht, ws, wt, mask, bs, bt = loss_inputs(gen, bias=True)
    extra = torch.randn(7, ws.shape[1] if padded == "student" else wt.shape[1], generator=gen)
    big_w = torch.cat([ws if padded == "student" else wt, 3 * extra])
    big_b = torch.cat([bs if padded == "student" else bt, torch.randn(7, generator=gen)])
    g = torch.rand((), generator=gen) + 0.5
    kwargs = dict(beta=beta, temperature=2.0)
    if padded == "student":
        w = big_w.clone().requires_grad_()
        ours = chunked_divergence_loss(hs, ht, w, wt, mask, student_lm_head_bias=big_b, teacher_lm_head_bias=bt,
                                       backend="torch", **kwargs)
        (grad_w,) = torch.autograd.grad(ours[0], w, g)
        assert grad_w[VOCAB:].abs().max().item() == 0.0
        ours = run_loss(chunked_divergence_loss, (hs, ht, big_w, wt, mask, big_b, bt), g, backend="torch", **kwargs)
        ours = ours[:3] + ([ours[3][0], ours[3][1][:VOCAB], ours[3][2][:VOCAB]],)
    else:
        ours = run_loss(chunked_divergence_loss, (hs, ht, ws, big_w, mask, bs, big_b), g, backend="torch", **kwargs)
    assert_same(ours, run_loss(TRL_LOSS, (hs, ht, ws, wt, mask, bs, bt), g, **kwargs))


def padded_copy(model, vocab):
    """The same model with its embedding and head grown to ``vocab`` rows of padding (random rows: the
    rule is about which rows a token can reach, not their values)."""
    bigger = tiny_model("Llama", model.config.hidden_size, {}, seed=5, vocab=vocab)
    state = model.state_dict()
    for name, value in bigger.state_dict().items():
        if value.shape != state[name].shape:
            state[name] = torch.cat([state[name], value[state[name].shape[0]:]])
    bigger.load_state_dict(state)
    return bigger


@pytest.mark.parametrize("padded", ["teacher", "student"])
def test_trainer_accepts_heads_padded_beyond_the_tokenizer(tmp_path, tokenizer, padded):
    """A teacher (or student) of 48 rows beside one of 40, the tokenizer's 40 tokens: TRL refuses the
    pair; fastkd's trainer gives TRL's loss and gradients for the unpadded pair."""
    student, teacher = tiny_model("Llama", 16, {}, seed=0), tiny_model("Llama", 24, {}, seed=1)
    args = trainer_args(tmp_path, beta=0.5, temperature=2.0)
    reference = trl_dt.DistillationTrainer(model=student, teacher_model=teacher, train_dataset=PROMPTS,
                                           processing_class=tokenizer, args=args)
    big_student = padded_copy(student, 48) if padded == "student" else student
    big_teacher = padded_copy(teacher, 48) if padded == "teacher" else teacher
    with pytest.raises(ValueError, match="vocab_size"):
        trl_dt.DistillationTrainer(model=big_student, teacher_model=big_teacher, train_dataset=PROMPTS,
                                   processing_class=tokenizer, args=args)
    trainer = FastKDDistillationTrainer(big_student, big_teacher, args, train_dataset=PROMPTS,  # positional too
                                        processing_class=tokenizer, fastkd_backend="torch")
    assert big_teacher.config.vocab_size == (48 if padded == "teacher" else VOCAB)  # restored after TRL's check
    gen = torch.Generator().manual_seed(0)
    inputs = {"prompt_ids": torch.randint(3, VOCAB, (2, 3), generator=gen), "prompt_mask": torch.ones(2, 3),
              "completion_ids": torch.randint(3, VOCAB, (2, 4), generator=gen),
              "completion_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    outs = []
    for model, run in ((big_student, trainer._compute_loss), (student, reference._compute_loss)):
        model.zero_grad(set_to_none=True)
        loss, entropy_sum, n_valid = run(model, inputs, None)
        loss.backward()
        grads = [p.grad[:VOCAB] if p.shape[0] == 48 else p.grad for p in model.parameters()]
        outs.append((loss.detach(), entropy_sum, n_valid, grads))
    assert_same(*outs)


@pytest.mark.parametrize("short", ["student", "teacher"])
def test_trainer_refuses_heads_that_miss_tokens(tmp_path, tokenizer, short):
    """A head with fewer rows than the tokenizer has tokens is not padding: refused, the sizes named."""
    sizes = dict(student=VOCAB, teacher=VOCAB + 8)
    sizes[short] = VOCAB - 4
    student = tiny_model("Llama", 16, {}, seed=0, vocab=sizes["student"])
    teacher = tiny_model("Llama", 24, {}, seed=1, vocab=sizes["teacher"])
    with pytest.raises(ValueError, match=rf"token ids 36\.\.39 have no row in the {short}'s head"):
        FastKDDistillationTrainer(model=student, teacher_model=teacher, train_dataset=PROMPTS,
                                  processing_class=tokenizer, args=trainer_args(tmp_path))
    assert teacher.config.vocab_size == sizes["teacher"]
