"""fastkd in TRL's ServerDistillationTrainer, offline: the vLLM teacher server is a fake client that
answers ``get_sequence_logprobs`` with the top-k log-probabilities of a tiny local teacher at the
requested temperature, in the client's own format (sorted, padded with -inf). Checked:
``server_forward_kl_loss`` equals a float64 evaluation of TRL's formula and TRL's own
``_compute_server_forward_kl_loss`` (value and the student's gradients; k = 1, 3, 4; T = 1, 2;
entries the server did not return; logit transforms), with TRL's tail (fastkd's "lumped") and
without it (both sides renormalised over the listed ids: "conditional"); the trainer's
``compute_loss`` equals TRL's on tiny Llama / Gemma 2 / Cohere / Granite students (loss and every
parameter's gradient), with and without the tail, keeps TRL's loss where fastkd has no equal mode
(beta > 0), refuses teacher ids beyond the student's head and accepts padding rows; and it trains
two steps like TRL."""
from __future__ import annotations

import math
import types

import pytest
import torch

from conftest import BACKENDS

pytest.importorskip("trl")

from test_integration_trl import PROMPTS, VOCAB, tiny_model, tokenizer  # noqa: E402,F401  (the fixture)
from trl.experimental.server_distillation import ServerDistillationConfig  # noqa: E402
from trl.experimental.server_distillation import server_distillation_trainer as trl_sd  # noqa: E402

from fastkd.integrations import trl_server  # noqa: E402
from fastkd.integrations.trl_server import FastKDServerDistillationTrainer, server_forward_kl_loss  # noqa: E402

TRL_SERVER = trl_sd.ServerDistillationTrainer


class FakeTeacherClient:
    """What ``VLLMClient.get_sequence_logprobs`` returns, from a local teacher: per completion token
    its top-k log-probabilities at ``temperature`` (log_softmax(logits / T), vLLM's processed
    logprobs), ids, and the actual token's log-probability (vLLM's prompt_logprobs list the
    actual token beside the top-k). ``short``: (sequence, position) pairs answered with one entry fewer."""

    def __init__(self, teacher, short=()):
        self.teacher, self.short, self.calls = teacher, set(short), []

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0, **_):
        self.calls.append(dict(top_logprobs=top_logprobs, temperature=temperature))
        out = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [], "actual_token_ids": []}
        for i, (seq, start) in enumerate(zip(sequences, prompt_lengths)):
            with torch.no_grad():
                logits = self.teacher(torch.tensor([seq])).logits[0].double()
            lp = (logits / temperature).log_softmax(-1)[start - 1:len(seq) - 1]  # predicts seq[start:]
            top = lp.topk(top_logprobs, -1)
            rows = {k: [] for k in out}
            for j, (values, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                if (i, j) in self.short:
                    values, ids = values[:-1], ids[:-1]
                token = seq[start + j]
                rows["logprobs"].append(values + [-math.inf] * (top_logprobs - len(values)))
                rows["logprob_token_ids"].append(ids + [0] * (top_logprobs - len(ids)))
                rows["actual_logprobs"].append([lp[j, token].item()])
                rows["actual_token_ids"].append([token])
            for k in out:
                out[k].append(rows[k])
        return out


# --- the loss function ------------------------------------------------------------------------

def server_inputs(gen, k, b=3, c=6, h=16, v=VOCAB, spread=3.0):
    """Hidden states, head, the teacher's top-k at T (-inf where the server gave fewer) and labels."""
    hidden = torch.randn(b, c, h, generator=gen)
    weight = spread * torch.randn(v, h, generator=gen) / h**0.5
    bias = torch.randn(v, generator=gen)
    teacher = (spread * torch.randn(b, c, v, generator=gen)).log_softmax(-1)
    lps, ids = teacher.topk(k, -1)
    if k > 1:
        lps[0, 1, -1] = -math.inf  # the server returned one entry fewer here
    labels = torch.zeros(b, c, dtype=torch.long)
    labels[0, 4:] = -100  # padded completion
    labels[2, :2] = -100  # the window's prompt positions
    return hidden, weight, bias, ids, lps, labels


def float64_reference(hidden, weight, bias, ids, lps, labels, temperature, scale=1.0, softcap=None, add_tail=True):
    """TRL's server forward KL, in float64, averaged over the counted positions, p = softmax(z / T).
    With the tail: D = sum_k q_k (log q_k - log p_k) + m (log m - log(1 - sum_k p_k)), m = 1 - sum_k q_k.
    Without (``add_tail=False``): both sides renormalised over the listed classes,
    D = sum_k q~_k (log q~_k - log p~_k), q~ = q / sum_k q_k, p~ = p_k / sum_k p_k."""
    z = scale * (hidden.double() @ weight.double().T + bias.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = (z / temperature).log_softmax(-1)
    listed = lps > -math.inf
    q = torch.where(listed, lps.double().exp(), 0.0)
    logp_k = logp.gather(-1, ids)
    if add_tail:
        listed_terms = torch.where(listed, q * (lps.double() - logp_k), 0.0).sum(-1)
        m = 1 - q.sum(-1)
        m_s = 1 - torch.where(listed, logp_k.exp(), 0.0).sum(-1)
        d = listed_terms + m * (m.log() - m_s.log())
    else:
        q_c = q / q.sum(-1, keepdim=True)
        # log p~ = log p_k - log sum_listed p, finite off the list (no 0 * inf in the gradient there)
        logp_c = logp_k - torch.where(listed, logp_k.exp(), 0.0).sum(-1, keepdim=True).log()
        d = torch.where(listed, q_c * (torch.where(listed, q_c, 1.0).log() - logp_c), 0.0).sum(-1)
    counted = labels != -100
    return d[counted].sum() / counted.sum()


def trl_server_loss(hidden, weight, bias, ids, lps, labels, temperature, scale=1.0, softcap=None, add_tail=True):
    """TRL's own method, from the student's full log-softmax as its compute_loss builds it."""
    z = scale * (hidden @ weight.T + bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    me = types.SimpleNamespace(loss_add_tail=add_tail, _reduce_divergence_loss=TRL_SERVER._reduce_divergence_loss)
    return TRL_SERVER._compute_server_forward_kl_loss(
        me, {"topk_logprobs": lps, "topk_token_ids": ids}, (z / temperature).log_softmax(-1), labels)


def with_grads(fn, hidden, weight, bias, g, *args, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    loss = fn(*leaves, *args, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, leaves, g))


@pytest.mark.parametrize("k, temperature, transform, add_tail", [
    pytest.param(1, 1.0, {}, True, id="top1-T1"),
    pytest.param(3, 2.0, {}, True, id="top3-T2"),
    pytest.param(3, 2.0, dict(scale=0.5, softcap=2.5), True, id="top3-T2-scale-softcap"),
    pytest.param(3, 1.0, {}, False, id="top3-T1-no-tail"),
    pytest.param(4, 2.0, dict(scale=0.5, softcap=2.5), False, id="top4-T2-scale-softcap-no-tail"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_equals_trl_and_float64(gen, backend, k, temperature, transform, add_tail):
    """With the tail (fastkd's "lumped") and without ("conditional"): padded completions, the
    window's prompt positions and an entry the server did not return."""
    hidden, weight, bias, ids, lps, labels = server_inputs(gen, k, spread=6.0 if transform else 3.0)
    g = torch.rand((), generator=gen) + 0.5

    def ours(h, w, b):
        return server_forward_kl_loss(h, w, ids, lps, labels, temperature, student_lm_head_bias=b,
                                      student_logit_scale=transform.get("scale", 1.0),
                                      student_final_logit_softcapping=transform.get("softcap"), backend=backend,
                                      loss_add_tail=add_tail)

    got = with_grads(ours, hidden, weight, bias, g)
    exact = with_grads(float64_reference, hidden, weight, bias, g, ids, lps, labels, temperature, **transform,
                       add_tail=add_tail)
    trl = with_grads(trl_server_loss, hidden, weight, bias, g, ids, lps, labels, temperature, **transform,
                     add_tail=add_tail)
    for a, b, e in zip(got, trl, exact):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-5, atol=1e-6 * e.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "no-tail"])
def test_loss_with_nothing_counted_is_zero_like_trl(gen, add_tail):
    hidden, weight, bias, ids, lps, labels = server_inputs(gen, 2)
    labels = torch.full_like(labels, -100)
    assert server_forward_kl_loss(hidden, weight, ids, lps, labels, 2.0, backend="torch",
                                  loss_add_tail=add_tail).item() == 0.0
    assert trl_server_loss(hidden, weight, bias, ids, lps, labels, 2.0, add_tail=add_tail).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tail_position_with_no_entry_adds_zero_like_trl(gen, backend):
    """A counted position the server answered with no entry: TRL's log-sum-exp over nothing is
    masked to 0 (the position still counts); fastkd's row has no divergence term. Same value and
    gradients, finite."""
    hidden, weight, bias, ids, lps, labels = server_inputs(gen, 3)
    lps[1, 2] = -math.inf
    assert labels[1, 2] != -100
    g = torch.rand((), generator=gen) + 0.5
    got = with_grads(lambda h, w, b: server_forward_kl_loss(h, w, ids, lps, labels, 2.0, student_lm_head_bias=b,
                                                            backend=backend, loss_add_tail=False),
                     hidden, weight, bias, g)
    trl = with_grads(trl_server_loss, hidden, weight, bias, g, ids, lps, labels, 2.0, add_tail=False)
    for a, b in zip(got, trl):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_ids_beyond_the_student_head_are_refused(gen):
    hidden, weight, bias, ids, lps, labels = server_inputs(gen, 2)
    ids[1, 3, 0] = VOCAB + 2  # a teacher with more rows than the student, listing one of them
    with pytest.raises(ValueError, match=rf"listed token id {VOCAB + 2}, but the student's head has {VOCAB} rows"):
        server_forward_kl_loss(hidden, weight, ids, lps, labels, 1.0, backend="torch")
    labels[1, 3] = -100  # not counted: not read
    server_forward_kl_loss(hidden, weight, ids, lps, labels, 1.0, backend="torch")


def test_tail_mapping():
    assert trl_server.fastkd_tail(0.0, True) == "lumped" and trl_server.fastkd_tail(0.0, False) == "conditional"
    assert trl_server.fastkd_tail(0.5, True) is None and trl_server.fastkd_tail(0.5, False) is None
    assert trl_server.fastkd_tail(1.0, True) is None


# --- through the trainer ----------------------------------------------------------------------

@pytest.fixture
def fake_server(monkeypatch):
    """TRL's trainer makes a VLLMClient when built (which would wait for a server): a stand-in that
    records the address, replaced by the fake teacher client afterwards."""
    import trl.generation.vllm_client as vllm_client

    monkeypatch.setattr(vllm_client, "VLLMClient", lambda base_url, **_: types.SimpleNamespace(base_url=base_url))


def server_args(tmp_path, **kwargs):
    return ServerDistillationConfig(output_dir=str(tmp_path), teacher_model_server_url="http://fake:8000",
                                    use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
                                    save_strategy="no", disable_tqdm=True, logging_steps=1, max_completion_length=4,
                                    per_device_train_batch_size=2, **kwargs)


def batch(seed=0, prompt=(4, 3), completion=(3, 5)):
    """Left-padded prompts, right-padded completions of different lengths (TRL's layout)."""
    gen = torch.Generator().manual_seed(seed)
    b, p, c = 3, prompt[0], completion[1]
    return {"prompt_ids": torch.randint(3, VOCAB, (b, p), generator=gen),
            "prompt_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]),
            "completion_ids": torch.randint(3, VOCAB, (b, c), generator=gen),
            "completion_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])}


def both_losses(trainer, student, inputs):
    """(loss, gradients) of fastkd's compute_loss, then TRL's, on the same inputs, as the second of three
    accumulated micro-batches (transformers' Trainer sets the count in train())."""
    trainer.current_gradient_accumulation_steps = 3
    outs = []
    for compute_loss in (trainer.compute_loss, lambda *a: TRL_SERVER.compute_loss(trainer, *a)):
        student.zero_grad(set_to_none=True)
        loss = compute_loss(student, inputs)
        loss.backward()
        outs.append((loss.detach(), [p.grad.clone() if p.grad is not None else None for p in student.parameters()]))
    return outs


def assert_same_step(ours, ref):
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-6, atol=1e-7)
    for a, b in zip(ours[1], ref[1]):
        if b is None:
            assert a is None or a.abs().max().item() == 0.0  # the head of an unused row
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 + 1e-6 * b.abs().max().item())


STUDENTS = [  # student family, config; loss_top_k, temperature, loss_add_tail
    pytest.param(("Llama", {}), 1, 1.0, True, id="llama-top1-T1"),
    pytest.param(("Gemma2", dict(final_logit_softcapping=3.0)), 4, 2.0, True, id="gemma2-softcap-top4-T2"),
    pytest.param(("Cohere", dict(logit_scale=0.5)), 3, 2.0, True, id="cohere-scale-top3-T2"),
    pytest.param(("Granite", dict(logits_scaling=0.5)), 2, 1.0, True, id="granite-scaling-top2-T1"),
    pytest.param(("Llama", {}), 3, 2.0, False, id="llama-top3-T2-no-tail"),
    pytest.param(("Gemma2", dict(final_logit_softcapping=3.0)), 4, 1.0, False, id="gemma2-softcap-top4-T1-no-tail"),
]


@pytest.mark.parametrize("student_spec, top_k, temperature, add_tail", STUDENTS)
def test_trainer_compute_loss_equals_trl(tmp_path, tokenizer, fake_server, monkeypatch, student_spec, top_k,
                                         temperature, add_tail):
    student, teacher = tiny_model(student_spec[0], 16, student_spec[1], seed=0), tiny_model("Llama", 24, {}, seed=1)
    trainer = FastKDServerDistillationTrainer(model=student, train_dataset=PROMPTS, processing_class=tokenizer,
                                              fastkd_backend="torch",
                                              args=server_args(tmp_path, beta=0.0, loss_top_k=top_k,
                                                               temperature=temperature, loss_add_tail=add_tail))
    assert trainer.teacher_client.base_url == "http://fake:8000"
    trainer.teacher_client = FakeTeacherClient(teacher, short={(1, 2)} if top_k > 1 else ())
    calls = []
    fused = trl_server.fused_linear_sparse_kd_loss
    monkeypatch.setattr(trl_server, "fused_linear_sparse_kd_loss", lambda *a, **k: calls.append(k) or fused(*a, **k))
    ours, ref = both_losses(trainer, student, batch())
    assert len(calls) == 1 and calls[0]["teacher_temperature"] == temperature
    assert calls[0]["tail"] == ("lumped" if add_tail else "conditional")
    assert all(c == dict(top_logprobs=top_k, temperature=temperature) for c in trainer.teacher_client.calls)
    assert_same_step(ours, ref)
    trainer.model.eval()  # no gradient-accumulation scaling; compute_loss(return_outputs=True) as TRL's evaluation
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(student, batch(), return_outputs=True)
        torch.testing.assert_close(loss, TRL_SERVER.compute_loss(trainer, student, batch()), rtol=2e-6, atol=1e-7)
    assert outputs is None


@pytest.mark.parametrize("config", [pytest.param(dict(beta=0.5), id="jsd-top1"),
                                    pytest.param(dict(beta=1.0), id="reverse-kl-top1")])
def test_trainer_keeps_trl_loss_where_fastkd_has_no_equal(tmp_path, tokenizer, fake_server, monkeypatch, config):
    student, teacher = tiny_model("Llama", 16, {}, seed=0), tiny_model("Llama", 24, {}, seed=1)
    trainer = FastKDServerDistillationTrainer(model=student, train_dataset=PROMPTS, processing_class=tokenizer,
                                              args=server_args(tmp_path, temperature=2.0, **config))
    trainer.teacher_client = FakeTeacherClient(teacher)
    monkeypatch.setattr(trl_server, "fused_linear_sparse_kd_loss", None)  # would raise if called
    inputs = batch()
    ours, ref = both_losses(trainer, student, inputs)
    assert ours[0].item() == ref[0].item()


def test_trainer_padded_student_head_and_refusal(tmp_path, tokenizer, fake_server):
    """A student with 8 padding rows beyond the tokenizer's 40 tokens trains against a teacher of 40;
    a teacher that lists an id beyond the student's rows is refused."""
    student, teacher = tiny_model("Llama", 16, {}, seed=0, vocab=VOCAB + 8), tiny_model("Llama", 24, {}, seed=1)
    trainer = FastKDServerDistillationTrainer(model=student, train_dataset=PROMPTS, processing_class=tokenizer,
                                              fastkd_backend="torch", args=server_args(tmp_path, beta=0.0,
                                                                                       loss_top_k=3))
    trainer.teacher_client = FakeTeacherClient(teacher)
    assert_same_step(*both_losses(trainer, student, batch()))
    big_teacher = tiny_model("Llama", 24, {}, seed=1, vocab=VOCAB + 16)
    with torch.no_grad():
        big_teacher.get_output_embeddings().weight[-1] = 50 * big_teacher.get_output_embeddings().weight[3]
    trainer.teacher_client = FakeTeacherClient(big_teacher)  # its padding row 55 is everyone's top-1
    with pytest.raises(ValueError, match=rf"listed token id {VOCAB + 15}, but the student's head has {VOCAB + 8} rows"):
        trainer.compute_loss(student, batch())
    short = tiny_model("Llama", 16, {}, seed=0, vocab=VOCAB - 4)  # a head missing tokens: not padding
    with pytest.raises(ValueError, match=r"head has 36 rows and the tokenizer 40 tokens: token ids 36\.\.39"):
        FastKDServerDistillationTrainer(model=short, train_dataset=PROMPTS, processing_class=tokenizer,
                                        args=server_args(tmp_path, beta=0.0))


@pytest.mark.filterwarnings("ignore:.is_gradient_checkpointing. is deprecated:FutureWarning")  # transformers', via TRL
def test_trainer_trains_two_steps_like_trl(tmp_path, tokenizer, fake_server, monkeypatch):
    calls = []
    fused = trl_server.fused_linear_sparse_kd_loss
    monkeypatch.setattr(trl_server, "fused_linear_sparse_kd_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))
    histories = {}
    for name, cls, extra in (("fastkd", FastKDServerDistillationTrainer, dict(fastkd_backend="torch")),
                             ("trl", TRL_SERVER, {})):
        trainer = cls(model=tiny_model("Llama", 16, {}, seed=0), train_dataset=PROMPTS, processing_class=tokenizer,
                      **extra, args=server_args(tmp_path / name, max_steps=2, learning_rate=1e-2, beta=0.0,
                                                loss_top_k=3, temperature=2.0, seed=3, gradient_accumulation_steps=2))
        trainer.teacher_client = FakeTeacherClient(tiny_model("Llama", 24, {}, seed=1))
        trainer.train()
        histories[name] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    assert len(histories["fastkd"]) == len(histories["trl"]) == 2
    for ours, ref in zip(histories["fastkd"], histories["trl"]):  # same seed: same samples, same steps
        assert ours["completions/mean_length"] == ref["completions/mean_length"]
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
