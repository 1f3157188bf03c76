"""fused_linear_kd_loss against float64 references of the materialised computation.

Tolerances: fp32 inputs are checked tightly (the chunked math is exact up to fp32 rounding). bf16
inputs: the chunk's logits are written in fp32 by the GEMM (never rounded to bf16 before the
softmax), so the loss is fp32-exact against float64 on the same bf16 operands (1e-6 relative;
1e-7 measured, 2e-4 when the logits were bf16); the gradients go through bf16 GEMMs on CUDA (fp32 ones
on a CPU) and come back in bf16, so each is compared at 6e-3 of its largest reference magnitude (3e-3 measured).
"""
import pytest
import torch

import fastkd
from conftest import BACKENDS
from reference import kd_objective, sparse_kd_objective
from test_loss import close

DTYPES = [pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"), pytest.param(torch.bfloat16, 1e-6, 6e-3, id="bf16")]


def make_side(n, h, v, gen, dtype, bias=True):
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 2 / h**0.5).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None
    return hidden, weight, b


def reference(hs, ws, bs, ht, wt, bt, labels, **kw):
    """float64: materialise both logits, match the vocabularies, then the KD objective."""
    s = hs @ ws.t() + (bs if bs is not None else 0)
    t = ht @ wt.t() + (bt if bt is not None else 0)
    v_s = ws.shape[0]
    if t.shape[1] > v_s:
        t = t[:, :v_s]
    elif t.shape[1] < v_s:
        t = torch.cat([t, t.new_full((t.shape[0], v_s - t.shape[1]), float("-inf"))], 1)
    kind = kw.pop("divergence", "kl")
    return kd_objective(s, t, labels, kind=kind, **kw)


def check(backend, student, teacher, labels, rtol_loss, rtol_grad, teacher_grad=False, chunk_size=None, **kw):
    leaves = [x.detach().requires_grad_(x is not None) if x is not None else None for x in (*student, *teacher)]
    if not teacher_grad:
        for x in leaves[3:]:
            if x is not None:
                x.requires_grad_(False)
    ref_leaves = [x.detach().double().requires_grad_(x.requires_grad) if x is not None else None for x in leaves]
    out = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], leaves[3], leaves[4], labels, student_bias=leaves[2],
                                      teacher_bias=leaves[5], chunk_size=chunk_size, backend=backend, **kw)
    ref_kw = {k: v for k, v in kw.items()}
    ref_kw.setdefault("temperature", 4.0)
    ref_kw.setdefault("alpha", 0.9)
    ref = reference(*ref_leaves, labels, **ref_kw)
    assert out.dtype == torch.float32 and out.shape == ()
    close(out, ref, rtol_loss)
    upstream = torch.tensor(1.7, dtype=torch.float64)
    got = [x for x in leaves if x is not None and x.requires_grad]
    want = [x for x in ref_leaves if x is not None and x.requires_grad]
    g_got = torch.autograd.grad(out, got, upstream.float())
    g_want = torch.autograd.grad(ref, want, upstream)
    for a, b, x in zip(g_got, g_want, got):
        assert a.dtype == x.dtype and a.shape == x.shape
        close(a, b, rtol_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol_loss,rtol_grad", DTYPES)
@pytest.mark.parametrize("vocab", [(300, 300), (300, 340), (300, 260)], ids=["same-V", "teacher-larger", "teacher-smaller"])
def test_matches_materialised_reference(backend, dtype, rtol_loss, rtol_grad, vocab, gen):
    n = 37  # chunk_size 8 does not divide it
    student = make_side(n, 24, vocab[0], gen, dtype)
    teacher = make_side(n, 40, vocab[1], gen, dtype)
    labels = torch.randint(0, vocab[0], (n,), generator=gen)
    labels[::5] = -100
    check(backend, student, teacher, labels, rtol_loss, rtol_grad, chunk_size=8, temperature=2.0, alpha=0.6)


def bf16_linear_pair(pair, gen, n, h, v):
    """(h_s, w_s, h_t, w_t, labels): bf16 hidden states and heads of a student "close" to its teacher
    (late in distillation) or a "random" pair, and labels."""
    h_t, w_t = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 2 / h**0.5
    if pair == "close":
        h_s = h_t + 0.1 * torch.randn(n, h, generator=gen)
        w_s = w_t + 0.1 * torch.randn(v, h, generator=gen) * 2 / h**0.5
    else:
        h_s, w_s = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 2 / h**0.5
    return (*(x.bfloat16() for x in (h_s, w_s, h_t, w_t)), torch.randint(0, v, (n,), generator=gen))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", ["close", "random"])
def test_bf16_logits_are_not_rounded_before_the_softmax(backend, pair, gen):
    """64 x 256 x 4000 bf16, alpha = 1, T = 1, a student close to its teacher (late in distillation:
    the divergence is small, so logits rounded to bf16 would be off by 3e-3 relative; 9e-8 from fp32
    chunk logits) and a random pair (5e-5 rounded; 3e-8): the dense and the sparse (top-K) losses
    against float64 on the same bf16 operands."""
    n, h, v = 64, 256, 4000
    h_s, w_s, h_t, w_t, labels = bf16_linear_pair(pair, gen, n, h, v)
    leaves = [x.requires_grad_() for x in (h_s, w_s)]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    t64 = h_t.double() @ w_t.double().t()
    ref = kd_objective(ref_leaves[0] @ ref_leaves[1].t(), t64, labels, 1.0, 1.0)
    out = fastkd.fused_linear_kd_loss(*leaves, h_t, w_t, labels, temperature=1.0, alpha=1.0, chunk_size=24,
                                      backend=backend)
    close(out, ref, 1e-6, msg="loss")
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    got, want = torch.autograd.grad(out, leaves, upstream.float()), torch.autograd.grad(ref, ref_leaves, upstream)
    for g, w, x in zip(got, want, leaves):
        assert g.dtype == torch.bfloat16 and g.shape == x.shape
        close(g, w, 6e-3)
    lp, ids = t64.log_softmax(-1).topk(64, -1)  # the sparse loss reads its student chunk the same way
    sparse = fastkd.fused_linear_sparse_kd_loss(*leaves, ids, lp.float(), labels, temperature=1.0, alpha=1.0,
                                                chunk_size=24, backend=backend)
    close(sparse, sparse_kd_objective(ref_leaves[0] @ ref_leaves[1].t(), ids, lp, labels, 1.0, 1.0), 1e-6,
          msg="sparse loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_divergences_reductions_and_teacher_gradients(backend, divergence, reduction, gen):
    student = make_side(2 * 11, 16, 90, gen, torch.float32)
    teacher = make_side(2 * 11, 16, 100, gen, torch.float32, bias=False)
    labels = torch.randint(0, 90, (22,), generator=gen)
    labels[3] = -100
    check(backend, student, teacher, labels, 1e-4, 1e-4, teacher_grad=True, chunk_size=5, divergence=divergence,
          beta=0.3, reduction=reduction, temperature=3.0, alpha=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_default_chunk(backend, gen):
    hs, ws, bs = make_side(24, 16, 50, gen, torch.float32)
    ht, wt, bt = make_side(24, 16, 50, gen, torch.float32)
    labels = torch.randint(0, 50, (24,), generator=gen)
    flat = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, backend=backend)
    shaped = fastkd.fused_linear_kd_loss(hs.reshape(2, 12, 16), ws, ht.reshape(2, 12, 16), wt, labels.reshape(2, 12),
                                         student_bias=bs, teacher_bias=bt, backend=backend)
    close(shaped, flat.double(), 1e-6)
    module = fastkd.FusedLinearKDLoss(backend=backend)
    close(module(hs, ws, ht, wt, labels, bs, bt), flat.double(), 1e-6)


@pytest.mark.parametrize("override,error,match", [
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(student_weight=torch.zeros(10, 7)), ValueError, "student_weight"),
    (dict(teacher_hidden=torch.zeros(5, 8)), ValueError, "leading"),
    (dict(student_bias=torch.zeros(3)), ValueError, "student_bias"),
    (dict(labels=torch.tensor([0, 1, 2, 10])), ValueError, "labels must lie"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(student_weight=torch.zeros(10, 8, dtype=torch.bfloat16)), TypeError, "share a dtype"),
])
def test_bad_input(override, error, match):
    kw = dict(student_hidden=torch.zeros(4, 8), student_weight=torch.zeros(10, 8), teacher_hidden=torch.zeros(4, 8),
              teacher_weight=torch.zeros(12, 8), labels=torch.tensor([0, 1, 2, 3]))
    kw.update(override)
    with pytest.raises(error, match=match):
        fastkd.fused_linear_kd_loss(**kw)


def test_with_transformers_models_hidden_states_and_lm_head():
    """The README's example: any Hugging Face causal LM exposing ``base_model`` hidden states and
    ``get_output_embeddings()``; tiny random models, built here, nothing downloaded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)

    def tiny(hidden, layers):
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
        return transformers.LlamaForCausalLM(cfg)

    teacher, student = tiny(64, 2), tiny(32, 1)
    input_ids = torch.randint(0, 128, (2, 9))
    labels = input_ids[:, 1:].clone()
    labels[0, :3] = -100  # e.g. the prompt

    with torch.no_grad():
        t_hidden = teacher.base_model(input_ids).last_hidden_state[:, :-1]
    s_hidden = student.base_model(input_ids).last_hidden_state[:, :-1]
    loss = fastkd.fused_linear_kd_loss(s_hidden, student.get_output_embeddings().weight, t_hidden,
                                       teacher.get_output_embeddings().weight, labels, temperature=2.0, alpha=0.5)
    loss.backward()
    fused_grad = student.get_output_embeddings().weight.grad.clone()
    student.zero_grad()
    s_logits = student(input_ids).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids).logits[:, :-1]
    materialised = fastkd.kd_loss(s_logits, t_logits, labels, temperature=2.0, alpha=0.5)
    materialised.backward()
    close(loss, materialised.double(), 1e-5)
    close(fused_grad, student.get_output_embeddings().weight.grad.double(), 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_without_gradients(backend, gen):
    hs, ws, bs = make_side(19, 16, 40, gen, torch.float32)
    ht, wt, bt = make_side(19, 16, 40, gen, torch.float32)
    labels = torch.randint(0, 40, (19,), generator=gen)
    with torch.no_grad():
        out = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, chunk_size=6,
                                          backend=backend)
    ref = reference(hs.double(), ws.double(), bs.double(), ht.double(), wt.double(), bt.double(), labels,
                    temperature=4.0, alpha=0.9)
    close(out, ref, 1e-4)
