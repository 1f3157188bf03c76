"""The offline teacher cache: round trip against a float64 top-K written here, random access,
every refusal (the broken file written here), interrupted writes, the ``fastkd cache-teacher``
command (digits and a tiny random Hugging Face model over a token file) and the study's
``--teacher-cache`` rows."""
import json
import math
import os
import pickle
import re
import stat

import numpy as np
import pytest
import torch

from fastkd.teacher_cache import CacheError, TeacherCache, TeacherCacheWriter, fingerprint, sample_teacher

# storage dtype, its relative rounding (half an ulp) for the log-probabilities
DTYPES = [pytest.param("float16", torch.float16, 2.0**-11, id="fp16"),
          pytest.param("bfloat16", torch.bfloat16, 2.0**-8, id="bf16")]


def reference_top_k(logits, k):
    """float64 (ids, log-probabilities) of the k largest entries of log_softmax, highest first."""
    logprobs = logits.double() - logits.double().exp().sum(-1, keepdim=True).log()
    order = logprobs.argsort(-1, descending=True)[..., :k]
    return order, logprobs.gather(-1, order)


def write_cache(path, logits, k, *, batch=8, shard_rows=None, **kw):
    """Writes ``logits`` (rows, *row_shape, V) through the writer in batches; small shards on request."""
    row_shape = tuple(logits.shape[1:-1])
    shard_bytes = shard_rows * max(1, int(np.prod(row_shape))) * k * 6 if shard_rows else 256 << 20
    with TeacherCacheWriter(path, k=k, vocab=logits.shape[-1], row_shape=row_shape, rows=len(logits),
                            shard_bytes=shard_bytes, **kw) as w:
        for part in logits.split(batch):
            w.add_logits(part)
    return path


def assert_matches_reference(ids, logprobs, logits, k, rel):
    ref_ids, ref_lp = reference_top_k(logits, k)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    err = (logprobs.double() - ref_lp).abs()
    assert (err <= rel * ref_lp.abs() + 1e-6).all(), float(err.max())


def dense_counts(ids, counts, vocab):
    """(rows, vocab) counts from sampled rows (ids padded with -1, counts 0 there)."""
    ids, counts = ids.reshape(-1, ids.shape[-1]).long(), counts.reshape(-1, counts.shape[-1]).long()
    dense = torch.zeros(len(ids), vocab + 1, dtype=torch.long)  # column vocab takes the padding
    return dense.scatter_add_(1, ids.where(ids >= 0, vocab), counts)[:, :vocab]


@pytest.mark.parametrize("lead", [(1,), (3, 5)], ids=["one-row", "rows-x-positions"])
@pytest.mark.parametrize("samples", [1, 7, 64])
def test_sample_teacher_rows_are_distinct_ids_with_counts(gen, lead, samples):
    logits = torch.randn(*lead, 13, generator=gen) * 2
    ids, counts = sample_teacher(logits.to(torch.bfloat16), samples, 1.5, generator=gen)
    assert ids.dtype == counts.dtype == torch.int32 and ids.shape == counts.shape == (*lead, samples)
    ids, counts = ids.reshape(-1, samples), counts.reshape(-1, samples)
    assert (counts.sum(-1) == samples).all()
    listed = ids >= 0
    assert torch.equal(listed, counts > 0) and (ids < 13).all() and (ids[~listed] == -1).all()
    assert (listed[:, :-1] >= listed[:, 1:]).all()  # padding only at the end
    assert (counts[:, :-1] >= counts[:, 1:]).all()  # highest count first
    tie = (counts[:, :-1] == counts[:, 1:]) & listed[:, 1:]
    assert (ids[:, :-1][tie] < ids[:, 1:][tie]).all()  # ties by id: rows are reproducible
    for row_ids, row_listed in zip(ids, listed):
        assert len(set(row_ids[row_listed].tolist())) == int(row_listed.sum())


def test_sample_teacher_is_reproducible_and_computed_in_fp32(gen):
    logits = torch.randn(9, 40, generator=gen).to(torch.bfloat16)
    seed = int(torch.randint(1 << 30, (1,), generator=gen))
    first = sample_teacher(logits, 16, 2.0, generator=torch.Generator().manual_seed(seed))
    again = sample_teacher(logits.float(), 16, torch.tensor(2.0), generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sample_teacher_counts_estimate_the_tempered_teacher(gen, temperature):
    """The mean of counts / S over N rows of one teacher is within 5 standard errors
    (sqrt(p (1 - p) / (S N)) per class) of softmax(z / T) computed in float64."""
    rows, samples = 3000, 8
    z = torch.randn(11, generator=gen, dtype=torch.float64) * 3
    z[4] = -float("inf")  # a class the teacher rules out is never drawn
    ids, counts = sample_teacher(z.float().expand(rows, 11), samples, temperature, generator=gen)
    estimate = dense_counts(ids, counts, 11).double().sum(0) / (rows * samples)
    p = (z / temperature).exp() / (z / temperature).exp().sum()
    tolerance = 5 * (p * (1 - p) / (rows * samples)).sqrt()
    assert (estimate - p).abs().le(tolerance).all() and estimate[4] == 0, (estimate - p).abs().max()


def test_sample_teacher_of_a_certain_teacher_lists_one_class(gen):
    logits = torch.full((2, 6), -float("inf"))
    logits[0, 3], logits[1, 0] = 0.0, 5.0
    ids, counts = sample_teacher(logits, 5, 1.0, generator=gen)
    assert ids.tolist() == [[3, -1, -1, -1, -1], [0, -1, -1, -1, -1]]
    assert counts.tolist() == [[5, 0, 0, 0, 0], [5, 0, 0, 0, 0]]
    ids, counts = sample_teacher(torch.randn(0, 3, 6), 4, 1.0)
    assert ids.shape == counts.shape == (0, 3, 4)


@pytest.mark.parametrize("args,message", [
    ((torch.randn(2, 5), 0, 1.0), "samples must be a positive integer, got 0"),
    ((torch.randn(2, 5), 2.0, 1.0), "samples must be a positive integer, got 2.0"),
    ((torch.randn(2, 5), 4, 0.0), "temperature must be a positive finite number, got 0.0"),
    ((torch.randn(2, 5), 4, float("nan")), "temperature must be a positive finite number, got nan"),
    ((torch.randn(2, 5), 4, "2"), "temperature must be a positive finite number, got '2'"),
    ((torch.arange(10).reshape(2, 5), 4, 1.0), "logits must be a floating-point tensor"),
])
def test_sample_teacher_refuses_bad_arguments(args, message):
    with pytest.raises(CacheError, match=re.escape(message)):
        sample_teacher(*args)


@pytest.mark.parametrize("dtype,torch_dtype,rel", DTYPES)
@pytest.mark.parametrize("row_shape", [(), (5,)], ids=["rows", "rows-x-positions"])
def test_round_trip_equals_the_teachers_top_k(tmp_path, gen, dtype, torch_dtype, rel, row_shape):
    logits = torch.randn(37, *row_shape, 50, generator=gen) * 3
    write_cache(tmp_path / "c", logits, 7, dtype=dtype, shard_rows=10)  # 4 shards, the last short
    cache = TeacherCache(tmp_path / "c", rows=37, vocab=50, k=7, dtype=dtype, row_shape=row_shape)
    assert len(cache) == 37 and len(list((tmp_path / "c").glob("shard-*-ids.npy"))) == 4
    ids, logprobs = cache.batch(torch.arange(37))
    assert ids.shape == logprobs.shape == (37, *row_shape, 7) and logprobs.dtype == torch_dtype
    assert_matches_reference(ids, logprobs, logits, 7, rel)


def test_random_access_across_shards(tmp_path, gen):
    logits = torch.randn(29, 12, generator=gen)
    cache = TeacherCache(write_cache(tmp_path / "c", logits, 3, shard_rows=4))
    ids_all, lp_all = cache.batch(range(29))
    order = torch.randperm(29, generator=gen)
    for i in order.tolist():
        ids, lp = cache[i]
        assert torch.equal(ids, ids_all[i]) and torch.equal(lp, lp_all[i])
    picked = torch.tensor([28, 0, 5, 5, 17, 3])  # out of order, repeated, every shard boundary side
    ids, lp = cache.batch(picked)
    assert torch.equal(ids, ids_all[picked]) and torch.equal(lp, lp_all[picked])
    assert torch.equal(cache[-1][0], ids_all[28])
    assert cache.batch(torch.tensor([], dtype=torch.long))[0].shape == (0, 3)
    with pytest.raises(IndexError):
        cache[29]
    with pytest.raises(IndexError):
        cache.batch([0, 29])
    again = pickle.loads(pickle.dumps(cache))  # as a DataLoader worker gets it: the maps reopen
    assert len(pickle.dumps(cache)) < 4096 and torch.equal(again.batch(picked)[1], lp)
    loader = torch.utils.data.DataLoader(cache, batch_size=8, shuffle=False)
    assert torch.equal(torch.cat([b[0] for b in loader]), ids_all)


def test_fewer_columns_from_a_larger_cache_are_the_top_k(tmp_path, gen):
    logits = torch.randn(9, 20, generator=gen)
    write_cache(tmp_path / "c", logits, 8)
    small = TeacherCache(tmp_path / "c", k=3, allow_larger_k=True)
    ids, lp = small.batch(range(9))
    assert_matches_reference(ids, lp, logits, 3, 2.0**-11)
    with pytest.raises(CacheError, match="top-8 entries per row, expected at least 9"):
        TeacherCache(tmp_path / "c", k=9, allow_larger_k=True)


def test_top_k_entries_from_a_serving_engine(tmp_path):
    """add(): ids and log-probabilities as a server returns them, padded with -1."""
    ids = torch.tensor([[4, 1, -1], [0, 2, 3]])
    lp = torch.tensor([[-0.1, -2.5, float("-inf")], [-0.5, -1.0, -3.0]])
    with TeacherCacheWriter(tmp_path / "c", k=3, vocab=5, dtype="bfloat16") as w:
        w.add(ids, lp)
    got_ids, got_lp = TeacherCache(tmp_path / "c").batch([0, 1])
    assert torch.equal(got_ids.long(), ids) and torch.equal(got_lp, lp.to(torch.bfloat16))


def test_a_zero_row_cache_is_valid(tmp_path):
    with TeacherCacheWriter(tmp_path / "c", k=2, vocab=4, rows=0):
        pass
    cache = TeacherCache(tmp_path / "c", rows=0)
    assert len(cache) == 0 and cache.batch([])[0].shape == (0, 2)


# ---- refusals: each names the file and what is wrong ----

@pytest.fixture
def good_cache(tmp_path, gen):
    logits = torch.randn(12, 4, 10, generator=gen)  # 12 rows of 4 positions, vocab 10
    return write_cache(tmp_path / "c", logits, 3, shard_rows=5, inputs_sha256=fingerprint(logits))


@pytest.mark.parametrize("expect,message", [
    (dict(rows=13), "index.json: the cache's rows is 12, expected 13"),
    (dict(vocab=11), "index.json: the cache's vocab is 10, expected 11"),
    (dict(k=4), "index.json: the cache holds the top-3 entries per row, expected 4"),
    (dict(dtype="bfloat16"), "index.json: the cache's logprobs dtype is float16, expected bfloat16"),
    (dict(row_shape=(5,)), "index.json: the cache's row shape is (4,), expected (5,)"),
    (dict(inputs_sha256="0" * 64), "index.json: written for other inputs"),
], ids=["rows", "vocab", "k", "dtype", "row-shape", "inputs"])
def test_refuses_a_cache_other_than_expected(good_cache, expect, message):
    with pytest.raises(CacheError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TeacherCache(good_cache, **expect)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:-7])


def _append(path):
    with open(path, "ab") as f:
        f.write(b"\0" * 6)


def _wrong_dtype(path):
    np.save(path, np.load(path).astype(np.int64))


def _not_npy(path):
    path.write_bytes(b"garbage, not an array")


@pytest.mark.parametrize("shard,damage,message", [
    ("shard-00001-logprobs.npy", _truncate, "bytes expected from its header: truncated"),
    ("shard-00002-ids.npy", _truncate, "truncated"),
    ("shard-00000-ids.npy", _append, "has trailing bytes"),
    ("shard-00001-ids.npy", _wrong_dtype, "holds int64 (5, 4, 3), index.json says int32 (5, 4, 3)"),
    ("shard-00000-logprobs.npy", _not_npy, "not a readable .npy file"),
    ("shard-00002-logprobs.npy", lambda p: p.unlink(), "missing (listed in index.json)"),
], ids=["truncated-logprobs", "truncated-ids", "trailing-bytes", "wrong-dtype", "not-npy", "missing"])
def test_refuses_a_damaged_shard(good_cache, shard, damage, message):
    damage(good_cache / shard)
    with pytest.raises(CacheError) as err:
        TeacherCache(good_cache)
    assert str(err.value).startswith(str(good_cache / shard)) and message in str(err.value)


def _edit_index(edit):
    def apply(folder):
        index = json.loads((folder / "index.json").read_text())
        edit(index)
        (folder / "index.json").write_text(json.dumps(index))
    return apply


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "index.json").unlink(), "index.json: missing; "),
    (lambda f: (f / "index.json").write_text('{"format": "fastkd-teacher-cache", "rows": 1'),
     "index.json: not valid JSON"),
    (_edit_index(lambda i: i.update(format="something-else")), "not a fastkd teacher cache index"),
    (_edit_index(lambda i: i.update(version=99)),
     "format version 99; this fastkd reads versions 1, 2; a newer fastkd wrote it"),
    (_edit_index(lambda i: i.update(version="2")), "format version '2'; this fastkd reads versions 1, 2"),
    (_edit_index(lambda i: i.update(kind="dense")), "corrupt (kind must be one of top_k, sampled, got 'dense')"),
    (_edit_index(lambda i: i.update(temperature=2.0)),
     "corrupt (temperature of a top_k cache must be 1.0 (log-probabilities at T = 1), got 2.0)"),
    (_edit_index(lambda i: i.update(rows=11)), "corrupt (the shards hold 12 rows, rows says 11)"),
    (_edit_index(lambda i: i.pop("k")), "corrupt (no field 'k')"),
    (_edit_index(lambda i: i["shards"][0].update(ids="../elsewhere.npy")), "is not a plain file name"),
], ids=["missing", "bad-json", "format", "version-too-new", "version-unknown", "kind", "top-k-temperature",
        "row-count", "missing-field", "path-escape"])
def test_refuses_a_missing_or_corrupt_index(good_cache, damage, message):
    damage(good_cache)
    with pytest.raises(CacheError) as err:
        TeacherCache(good_cache)
    assert str(err.value).startswith(str(good_cache / "index.json")) and message in str(err.value)


def test_refuses_what_is_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="no such folder"):
        TeacherCache(tmp_path / "nowhere")


@pytest.mark.parametrize("call,message", [
    (lambda w: w.add(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 2)), "must both be (rows, 3)"),
    (lambda w: w.add(torch.zeros(2, 3), torch.zeros(2, 3)), "ids must be integers"),
    (lambda w: w.add(torch.full((2, 3), 10), -torch.ones(2, 3)), "ids must lie in [-1, 10)"),
    (lambda w: w.add(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)), "pass logits to add_logits"),
    (lambda w: w.add_logits(torch.zeros(2, 11)), "logits have 11 classes, the cache's vocab is 10"),
], ids=["shape", "float-ids", "id-range", "positive-logprobs", "vocab"])
def test_writer_refuses_bad_rows(tmp_path, call, message):
    with pytest.raises(CacheError) as err, TeacherCacheWriter(tmp_path / "c", k=3, vocab=10) as w:
        call(w)
    assert message in str(err.value)
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())


def test_writer_refuses_to_replace_without_overwrite(good_cache, gen):
    with pytest.raises(CacheError, match="exists; pass overwrite=True"):
        TeacherCacheWriter(good_cache, k=3, vocab=10)
    (good_cache.parent / "notes").mkdir()
    with pytest.raises(CacheError, match="exists and is not a teacher cache"):
        TeacherCacheWriter(good_cache.parent / "notes", k=3, vocab=10, overwrite=True)
    logits = torch.randn(6, 10, generator=gen)
    write_cache(good_cache, logits, 2, overwrite=True)
    assert len(TeacherCache(good_cache, k=2, row_shape=())) == 6
    assert sorted(p.name for p in good_cache.parent.iterdir()) == ["c", "notes"]


# ---- format versions, and sampled caches ----

def test_writes_version_2_and_reads_a_version_1_cache(tmp_path, gen):
    """A cache written the way fastkd wrote them before sampled caches (version 1, no kind or
    temperature) reads as a top-K cache at T = 1, with the same rows."""
    logits = torch.randn(7, 3, 12, generator=gen)
    ids, lp = reference_top_k(logits, 4)
    old = tmp_path / "v1"
    old.mkdir()
    np.save(old / "shard-00000-ids.npy", ids.numpy().astype(np.int32))
    np.save(old / "shard-00000-logprobs.npy", lp.numpy().astype(np.float16))
    (old / "index.json").write_text(json.dumps({
        "format": "fastkd-teacher-cache", "version": 1, "rows": 7, "row_shape": [3], "k": 4, "vocab": 12,
        "ids_dtype": "int32", "logprobs_dtype": "float16", "inputs_sha256": None, "source": {},
        "shards": [{"ids": "shard-00000-ids.npy", "logprobs": "shard-00000-logprobs.npy", "rows": 7}]}))
    cache = TeacherCache(old, rows=7, vocab=12, k=4, row_shape=(3,))
    assert (cache.kind, cache.temperature, cache.samples) == ("top_k", 1.0, None)
    assert_matches_reference(*cache.batch(range(7)), logits, 4, 2.0**-11)
    index = json.loads((write_cache(tmp_path / "v2", logits, 4) / "index.json").read_text())
    assert (index["version"], index["kind"], index["temperature"]) == (2, "top_k", 1.0) and "samples" not in index


def write_sampled(path, logits, samples, temperature, *, seed, batch=8, shard_rows=None, **kw):
    """Writes S draws per row of ``logits`` through the writer, in batches, from a seeded generator."""
    row_shape = tuple(logits.shape[1:-1])
    shard_bytes = shard_rows * max(1, int(np.prod(row_shape))) * samples * 6 if shard_rows else 256 << 20
    with TeacherCacheWriter(path, samples=samples, temperature=temperature, vocab=logits.shape[-1],
                            row_shape=row_shape, rows=len(logits), shard_bytes=shard_bytes,
                            generator=torch.Generator().manual_seed(seed), **kw) as w:
        for part in logits.split(batch):
            w.add_logits(part)
    return path


@pytest.mark.parametrize("row_shape", [(), (5,)], ids=["rows", "rows-x-positions"])
def test_sampled_round_trip_returns_log_count_over_s(tmp_path, gen, row_shape):
    logits = torch.randn(23, *row_shape, 30, generator=gen) * 2
    write_sampled(tmp_path / "c", logits, 6, 2.5, seed=11, shard_rows=7)  # 4 shards, the last short
    cache = TeacherCache(tmp_path / "c", rows=23, vocab=30, k=6, row_shape=row_shape)
    assert (cache.kind, cache.temperature, cache.samples, cache.dtype) == ("sampled", 2.5, 6, "float32")
    assert len(list((tmp_path / "c").glob("shard-*-counts.npy"))) == 4
    assert np.load(tmp_path / "c" / "shard-00000-counts.npy").dtype == np.uint16
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert {k: index[k] for k in ("version", "kind", "temperature", "samples", "k", "counts_dtype")} == \
        {"version": 2, "kind": "sampled", "temperature": 2.5, "samples": 6, "k": 6, "counts_dtype": "uint16"}
    # the same draws, made here batch by batch from the same seed
    g = torch.Generator().manual_seed(11)
    want = [sample_teacher(part, 6, 2.5, generator=g) for part in logits.split(8)]
    want_ids, want_counts = torch.cat([w[0] for w in want]), torch.cat([w[1] for w in want])
    ids, lp = cache.batch(torch.arange(23))
    assert torch.equal(ids, want_ids) and lp.dtype == torch.float32
    assert torch.equal(lp, (want_counts.double() / 6).log().float())  # log(c/S) rounded once; -inf on padding
    picked = [22, 0, 7, 7]
    assert torch.equal(cache.batch(picked)[1], lp[picked]) and torch.equal(cache[-1][0], ids[22])
    assert "sampled, samples=6, temperature=2.5" in repr(cache)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampled_rows_are_the_count_estimate_at_t_in_sparse_kd_loss(tmp_path, gen, backend):
    """A sampled cache's rows with teacher_temperature = the cache's T are the target
    q_k = count_k / S as given: loss and gradient equal a float64 KL(q || softmax(s / T)) written here
    (missing mass 0: every tail the same)."""
    import fastkd

    rows, vocab, samples, temperature = 23, 37, 7, 3.0
    write_sampled(tmp_path / "c", torch.randn(rows, vocab, generator=gen) * 3, samples, temperature, seed=1)
    cache = TeacherCache(tmp_path / "c")
    ids, lp = cache.batch(range(rows))
    student = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    listed = ids >= 0
    q = torch.zeros(rows, vocab, dtype=torch.float64).scatter_add_(
        1, ids.long().clamp(min=0), torch.where(listed, lp.double().exp(), 0.0))
    assert torch.allclose(q.sum(-1), torch.ones(rows, dtype=torch.float64))
    s64 = student.clone().requires_grad_()
    log_p = (s64 / temperature).log_softmax(-1)
    kl = torch.where(q > 0, q * (q.log() - log_p), 0.0).sum(-1)
    ref = (0.9 * temperature**2 * kl + 0.1 * torch.nn.functional.cross_entropy(s64, labels, reduction="none")).mean()
    (ref * upstream).backward()
    for tail in ("bucket", "renormalize", "lumped"):
        s = student.float().requires_grad_()
        loss = fastkd.sparse_kd_loss(s, ids, lp, labels, temperature=temperature, alpha=0.9, tail=tail,
                                     teacher_temperature=cache.temperature, backend=backend)
        (loss * upstream.float()).backward()
        assert abs(loss.item() - ref.item()) < 1e-5 * (1 + ref.item()), tail
        assert torch.allclose(s.grad.double(), s64.grad, atol=1e-7, rtol=1e-5), tail


def test_sampled_rows_from_a_serving_engine_are_stored_in_order(tmp_path):
    """add_samples(): ids and counts in any order come back highest count first, ties by id."""
    ids = torch.tensor([[2, -1, 0, 5, -1], [3, 1, 4, -1, 0]])
    counts = torch.tensor([[1, 0, 3, 1, 0], [1, 2, 1, 0, 1]])
    with TeacherCacheWriter(tmp_path / "c", samples=5, temperature=1.0, vocab=6) as w:
        w.add_samples(ids, counts)
    got_ids, lp = TeacherCache(tmp_path / "c").batch([0, 1])
    assert got_ids.tolist() == [[0, 2, 5, -1, -1], [1, 0, 3, 4, -1]]
    assert torch.equal(lp, (torch.tensor([[3, 1, 1, 0, 0], [2, 1, 1, 1, 0]]).double() / 5).log().float())


@pytest.mark.parametrize("call,message", [
    (lambda w: w.add_samples(torch.tensor([[1, 2, -1]]), torch.tensor([[2, 0, 0]])),
     "counts must be >= 1 on a listed id and 0 on padding (id -1)"),
    (lambda w: w.add_samples(torch.tensor([[1, -1, -1]]), torch.tensor([[2, 1, 0]])),
     "counts must be >= 1 on a listed id and 0 on padding (id -1)"),
    (lambda w: w.add_samples(torch.tensor([[1, 2, -1]]), torch.tensor([[2, 2, 0]])),
     "every row's counts must sum to samples=3, got 4"),
    (lambda w: w.add_samples(torch.tensor([[1, 1, -1]]), torch.tensor([[2, 1, 0]])), "a row lists an id twice"),
    (lambda w: w.add_samples(torch.tensor([[1, 9, -1]]), torch.tensor([[2, 1, 0]])), "ids must lie in [-1, 9)"),
    (lambda w: w.add_samples(torch.tensor([[1, 2, -1]]), torch.tensor([[2.0, 1.0, 0.0]])),
     "counts must be integers"),
    (lambda w: w.add(torch.tensor([[1, 2, -1]]), -torch.ones(1, 3)), "a sampled cache takes add_samples"),
], ids=["zero-count", "count-on-padding", "sum", "twice", "id-range", "float-counts", "add"])
def test_sampled_writer_refuses_bad_rows(tmp_path, call, message):
    with pytest.raises(CacheError, match=re.escape(message)), \
            TeacherCacheWriter(tmp_path / "c", samples=3, temperature=2.0, vocab=9) as w:
        call(w)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kw,message", [
    (dict(samples=0, temperature=1.0), "samples must be an integer in [1, 65535], got 0"),
    (dict(samples=65536, temperature=1.0), "samples must be an integer in [1, 65535], got 65536"),
    (dict(samples=4), "temperature must be a positive finite number, got None"),
    (dict(samples=4, temperature=-2.0), "temperature must be a positive finite number, got -2.0"),
    (dict(samples=4, temperature=float("inf")), "temperature must be a positive finite number, got inf"),
    (dict(samples=4, temperature=1.0, k=3), "a sampled cache keeps all S = 4 columns per row, got k=3"),
    (dict(samples=4, temperature=1.0, dtype="float16"), "a sampled cache stores counts (uint16)"),
    (dict(k=3, temperature=4.0), "a top-K cache holds log-probabilities at T = 1, got temperature=4.0"),
], ids=["zero", "above-uint16", "no-temperature", "negative-T", "inf-T", "k", "dtype", "top-k-T"])
def test_writer_refuses_bad_settings(tmp_path, kw, message):
    with pytest.raises(CacheError, match=re.escape(message)):
        TeacherCacheWriter(tmp_path / "c", vocab=9, **kw)
    assert not list(tmp_path.iterdir())


@pytest.fixture
def sampled_cache(tmp_path, gen):
    logits = torch.randn(12, 4, 10, generator=gen) * 2  # 12 rows of 4 positions, vocab 10
    return write_sampled(tmp_path / "s", logits, 5, 4.0, seed=3, shard_rows=5)


def _edit_shard(name, edit):
    def apply(folder):
        a = np.load(folder / name)
        edit(a)
        np.save(folder / name, a)
    return apply


def _zero_a_listed_count(a):
    a[1, 2, 0] = 0  # the first column of a row is always listed


def _add_a_count(a):
    a[1, 2, 0] += 1


def _id_out_of_range(a):
    a[1, 2, 0] = 10


@pytest.mark.parametrize("damage,file,message", [
    (lambda f: (f / "shard-00001-counts.npy").unlink(), "shard-00001-counts.npy",
     "missing (listed in index.json)"),
    (_edit_index(lambda i: i["shards"][1].pop("counts")), "index.json", "corrupt (no field 'counts')"),
    (_edit_index(lambda i: i.update(temperature=-1.0)), "index.json",
     "corrupt (temperature must be a positive finite number, got -1.0)"),
    (_edit_index(lambda i: i.update(temperature="4")), "index.json",
     "corrupt (temperature must be a positive finite number, got '4')"),
    (_edit_index(lambda i: i.update(temperature=0)), "index.json",
     "corrupt (temperature must be a positive finite number, got 0)"),
    (_edit_index(lambda i: i.pop("temperature")), "index.json", "corrupt (no field 'temperature')"),
    (_edit_index(lambda i: i.update(samples=6)), "index.json",
     "corrupt (k of a sampled cache must equal samples (6), got 5)"),
    (_edit_index(lambda i: i.update(version=3)), "index.json",
     "format version 3; this fastkd reads versions 1, 2; a newer fastkd wrote it"),
], ids=["missing-counts", "no-counts-field", "negative-T", "string-T", "zero-T", "no-T", "samples", "version"])
def test_refuses_a_bad_sampled_cache_on_opening(sampled_cache, damage, file, message):
    damage(sampled_cache)
    with pytest.raises(CacheError) as err:
        TeacherCache(sampled_cache)
    text = str(err.value)
    assert text.startswith(str(sampled_cache / file)) and message in text and "\n" not in text, text


@pytest.mark.parametrize("damage,file,message", [
    (_edit_shard("shard-00001-counts.npy", _zero_a_listed_count), "shard-00001-counts.npy",
     "row 6: counts must be >= 1 on a listed id, got 0"),
    (_edit_shard("shard-00001-counts.npy", _add_a_count), "shard-00001-counts.npy",
     "row 6: counts sum to 6, not samples = 5 (index.json)"),
    (_edit_shard("shard-00001-ids.npy", _id_out_of_range), "shard-00001-ids.npy",
     "row 6: ids outside [-1, 10) (the vocabulary), e.g. 10"),
], ids=["zero-count", "sum", "id-range"])
def test_refuses_bad_sampled_rows_when_read(sampled_cache, damage, file, message):
    damage(sampled_cache)
    cache = TeacherCache(sampled_cache)
    assert cache.batch([0, 11])[0].shape == (2, 4, 5)  # the good rows still read
    for read in (lambda: cache.batch(range(12)), lambda: cache[6]):
        with pytest.raises(CacheError) as err:
            read()
        assert str(err.value) == f"{sampled_cache / file}: {message}"


def test_refuses_top_k_ids_out_of_range_when_read(good_cache):
    _edit_shard("shard-00002-ids.npy", lambda a: a.__setitem__((0, 3, 2), -2))(good_cache)
    with pytest.raises(CacheError) as err:
        TeacherCache(good_cache).batch(range(12))
    assert str(err.value) == f"{good_cache / 'shard-00002-ids.npy'}: row 10: ids outside [-1, 10) " \
                             "(the vocabulary), e.g. -2"


def test_a_sampled_cache_is_read_whole(sampled_cache):
    with pytest.raises(CacheError, match=re.escape("holds S = 5 samples per row (all needed), expected k=3")):
        TeacherCache(sampled_cache, k=3, allow_larger_k=True)
    with pytest.raises(CacheError, match="the cache's logprobs dtype is float32, expected float16"):
        TeacherCache(sampled_cache, dtype="float16")


# ---- interrupted writes ----

def test_an_exception_midway_leaves_no_cache(tmp_path, gen):
    logits = torch.randn(40, 10, generator=gen)
    with pytest.raises(KeyboardInterrupt):
        with TeacherCacheWriter(tmp_path / "c", k=3, vocab=10, shard_bytes=5 * 3 * 6) as w:
            for i, part in enumerate(logits.split(8)):
                if i == 3:
                    raise KeyboardInterrupt  # shards already written, the rest not
                w.add_logits(part)
    assert not list(tmp_path.iterdir())
    with pytest.raises(CacheError, match="c: no such folder"):
        TeacherCache(tmp_path / "c")


def test_a_killed_write_leaves_only_a_hidden_partial_folder(tmp_path, gen, monkeypatch):
    """A process killed before the index is written (no cleanup runs): nothing at the cache's
    path, and the partial folder itself is refused for want of an index."""
    import fastkd.teacher_cache as tc

    w = TeacherCacheWriter(tmp_path / "c", k=3, vocab=10, shard_bytes=5 * 3 * 6)
    w.add_logits(torch.randn(23, 10, generator=gen))

    def killed(self):
        raise SystemExit("killed")

    monkeypatch.setattr(tc.TeacherCacheWriter, "abort", lambda self: None)  # no cleanup on a kill
    monkeypatch.setattr(tc.TeacherCacheWriter, "_write_index", killed)
    with pytest.raises(SystemExit):
        w.close()
    assert not (tmp_path / "c").exists()
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".c.") and list(partial.glob("shard-*"))
    with pytest.raises(CacheError, match="index.json: missing"):
        TeacherCache(partial)


def test_a_failed_overwrite_keeps_the_old_cache(good_cache, gen):
    before = TeacherCache(good_cache).batch(range(12))
    with pytest.raises(RuntimeError):
        with TeacherCacheWriter(good_cache, k=2, vocab=10, overwrite=True) as w:
            w.add_logits(torch.randn(3, 10, generator=gen))
            raise RuntimeError("teacher crashed")
    after = TeacherCache(good_cache).batch(range(12))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_short_write_is_not_kept(tmp_path, gen):
    with pytest.raises(CacheError, match="5 rows were written, 6 expected; the cache is not kept"):
        with TeacherCacheWriter(tmp_path / "c", k=2, vocab=10, rows=6) as w:
            w.add_logits(torch.randn(5, 10, generator=gen))
    assert not list(tmp_path.iterdir())


# ---- fastkd cache-teacher: the study's data ----

def run_cli(capsys, *args):
    from fastkd.study.cli import main

    capsys.readouterr()  # what came before (a model's save_pretrained progress bar) is not ours
    code = main(["cache-teacher", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


@pytest.fixture(scope="module")
def digits():
    from fastkd.study.data import load_digits

    return load_digits("cpu")


def digits_teacher(seed=3):
    from fastkd.study.models import build_model

    torch.manual_seed(seed)
    return build_model("mlp-large", (64,), 10).eval()


def test_cli_caches_a_study_teacher_checkpoint(capsys, tmp_path, digits):
    teacher = digits_teacher()
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pt")
    code, out, err = run_cli(capsys, "--out", str(tmp_path / "c"), "--k", "4", "--split", "val",
                             "--teacher-ckpt", str(tmp_path / "teacher.pt"))
    assert code == 0 and "TeacherCache(" in out and "rows=359" in out, err
    cache = TeacherCache(tmp_path / "c", rows=359, vocab=10, k=4, inputs_sha256=fingerprint(digits.x_val))
    assert cache.source["split"] == "val" and cache.source["teacher_ckpt"] == str(tmp_path / "teacher.pt")
    with torch.no_grad():
        logits = teacher.double()(digits.x_val.double())
    assert_matches_reference(*cache.batch(range(359)), logits, 4, 2.0**-11)


def test_cli_trains_the_teacher_when_given_none(capsys, tmp_path, digits):
    """Trained as the study trains it; its checkpoint is kept inside the cache."""
    code, out, err = run_cli(capsys, "--out", str(tmp_path / "c"), "--k", "2", "--teacher-epochs", "1",
                             "--dtype", "bfloat16")
    assert code == 0, err
    cache = TeacherCache(tmp_path / "c", rows=1078, k=2, dtype="bfloat16", inputs_sha256=fingerprint(digits.x_train))
    teacher = digits_teacher()
    teacher.load_state_dict(torch.load(tmp_path / "c" / "teacher.pt", weights_only=True)["model"])
    with torch.no_grad():
        logits = teacher.double()(digits.x_train.double())
    assert_matches_reference(*cache.batch(range(1078)), logits, 2, 2.0**-8)
    assert cache.source["teacher_epochs"] == 1 and not [p for p in tmp_path.iterdir() if p.name != "c"]


def test_cli_samples_a_study_teacher_checkpoint(capsys, tmp_path, digits):
    """--sample S --temperature T: the draws sample_teacher makes from the teacher's logits with a
    generator seeded from --sample-seed (the same rows, the same order)."""
    from fastkd.study.train import predict

    teacher = digits_teacher()
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pt")
    code, out, err = run_cli(capsys, "--out", str(tmp_path / "c"), "--sample", "8", "--temperature", "2",
                             "--sample-seed", "5", "--split", "val", "--teacher-ckpt", str(tmp_path / "teacher.pt"))
    assert code == 0 and "sampled, samples=8, temperature=2" in out and "rows=359" in out, err
    cache = TeacherCache(tmp_path / "c", rows=359, vocab=10, k=8, inputs_sha256=fingerprint(digits.x_val))
    assert (cache.kind, cache.temperature, cache.samples) == ("sampled", 2.0, 8)
    assert cache.source["split"] == "val" and cache.source["sample_seed"] == 5
    want_ids, want_counts = sample_teacher(predict(teacher, digits, digits.x_val), 8, 2.0,
                                           generator=torch.Generator().manual_seed(5))
    ids, lp = cache.batch(range(359))
    assert torch.equal(ids, want_ids) and torch.equal(lp, (want_counts.double() / 8).log().float())


@pytest.mark.parametrize("args,message", [
    ([], "--out is required"),
    (["--dtype", "float16"], "--k K (the top-K kept per row) or --sample S (draws per row) is required"),
    (["--sample", "0"], "--sample must be an integer in [1, 65535] (draws per row), got 0"),
    (["--sample", "65536"], "--sample must be an integer in [1, 65535] (draws per row), got 65536"),
    (["--sample", "4", "--k", "3"], "--k and --sample exclude each other"),
    (["--sample", "4", "--temperature", "0"], "--temperature must be a positive finite number, got 0.0"),
    (["--sample", "4", "--temperature", "nan"], "--temperature must be a positive finite number, got nan"),
    (["--sample", "4", "--dtype", "bfloat16"], "--dtype is for top-K caches; a sampled cache stores counts"),
    (["--k", "3", "--temperature", "2"], "--temperature goes with --sample (a top-K cache is at T = 1)"),
    (["--k", "3", "--sample-seed", "2"], "--sample-seed goes with --sample"),
    (["--k", "0"], "--k must be an integer >= 1"),
    (["--k", "3", "--dtype", "fp8"], "--dtype must be one of float16, bfloat16"),
    (["--k", "3", "--model", "m"], "--model and --tokens go together"),
    (["--k", "3", "--model", "m", "--tokens", "t.npy", "--teacher-ckpt", "x.pt"],
     "--teacher-ckpt is for the study's data, not for --model"),
    (["--k", "3", "--split", "dev"], "unknown split 'dev'; choose from train, val, test"),
    (["--k", "3", "--teacher-ckpt", "x.pt", "--teacher-epochs", "2"], "exclude each other"),
    (["--k", "3", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--k", "11", "--teacher-ckpt", "x.pt"], "k must lie in [1, vocab=10], got 11"),
    (["--k", "3", "--teacher-ckpt", "missing.pt"], "cannot read checkpoint missing.pt"),
    (["--k", "3", "--model", "nowhere", "--tokens", "t.npy"], "--tokens t.npy: no such file"),
], ids=["no-out", "neither", "sample-0", "sample-above-uint16", "k-and-sample", "zero-T", "nan-T",
        "dtype-sampled", "T-top-k", "seed-top-k", "k", "dtype", "model-alone", "mixed", "split", "ckpt-and-epochs",
        "dataset", "k-above-vocab", "ckpt", "tokens"])
def test_cli_bad_arguments_end_in_one_line(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *([] if not args else ["--out", "c"]), *args)
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # nothing written, not even a partial folder


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_cli_cache_folder_honours_the_umask(capsys, tmp_path, umask):
    """The cache folder and its files get the permissions the umask gives, as any folder a command
    makes (a temporary folder renamed into place would be 0700 whatever the umask)."""
    torch.save({"model": digits_teacher().state_dict()}, tmp_path / "teacher.pt")
    old = os.umask(umask)
    try:
        code, _, err = run_cli(capsys, "--out", str(tmp_path / "c"), "--k", "2", "--split", "test",
                               "--teacher-ckpt", str(tmp_path / "teacher.pt"))
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o777 & ~umask
    for f in (tmp_path / "c").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_cli_refuses_to_overwrite_unless_asked(capsys, tmp_path, good_cache):
    torch.save({"model": digits_teacher().state_dict()}, tmp_path / "teacher.pt")
    args = ("--out", str(good_cache), "--k", "3", "--teacher-ckpt", str(tmp_path / "teacher.pt"))
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "exists; pass overwrite=True (--overwrite)" in err
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    assert len(TeacherCache(good_cache, k=3, row_shape=())) == 1078


# ---- fastkd cache-teacher: a Hugging Face causal LM over a token file ----

def save_tiny_llama(folder, hidden, layers, vocab=96, seed=0):
    """A randomly initialised Llama, saved as a local model folder (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_cli_caches_a_causal_lm_over_a_token_file(capsys, tmp_path, gen, suffix):
    teacher = save_tiny_llama(tmp_path / "teacher", 32, 2)
    tokens = torch.randint(0, 96, (5, 7), generator=gen, dtype=torch.int32)  # 5 sequences of 7 tokens
    path = tmp_path / f"tokens{suffix}"
    np.save(path, tokens.numpy()) if suffix == ".npy" else torch.save(tokens, path)
    code, out, err = run_cli(capsys, "--model", str(tmp_path / "teacher"), "--tokens", str(path), "--k", "5",
                             "--batch-size", "2", "--out", str(tmp_path / "c"), "--dtype", "bfloat16")
    assert code == 0, err
    cache = TeacherCache(tmp_path / "c", rows=5, row_shape=(7,), vocab=96, k=5, dtype="bfloat16",
                         inputs_sha256=fingerprint(tokens.numpy()))
    with torch.no_grad():
        logits = teacher(input_ids=tokens.long()).logits
    assert_matches_reference(*cache.batch(range(5)), logits, 5, 2.0**-8)
    ids, logprobs = cache[3]  # one sequence: (positions, K)
    assert ids.shape == logprobs.shape == (7, 5)


def test_cli_samples_a_causal_lm_over_a_token_file(capsys, tmp_path, gen):
    """--sample without --temperature: fastkd distill's default T; S draws at every position."""
    teacher = save_tiny_llama(tmp_path / "teacher", 32, 2)
    tokens = torch.randint(0, 96, (5, 7), generator=gen, dtype=torch.int32)
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    code, out, err = run_cli(capsys, "--model", str(tmp_path / "teacher"), "--tokens", str(tmp_path / "tokens.npy"),
                             "--sample", "6", "--batch-size", "2", "--out", str(tmp_path / "c"))
    assert code == 0, err
    cache = TeacherCache(tmp_path / "c", rows=5, row_shape=(7,), vocab=96, k=6,
                         inputs_sha256=fingerprint(tokens.numpy()))
    assert (cache.kind, cache.temperature, cache.samples) == ("sampled", 4.0, 6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        want = [sample_teacher(teacher(input_ids=part.long()).logits, 6, 4.0, generator=g) for part in tokens.split(2)]
    ids, lp = cache.batch(range(5))
    assert ids.shape == (5, 7, 6) and torch.equal(ids, torch.cat([w[0] for w in want]))
    assert torch.equal(lp, (torch.cat([w[1] for w in want]).double() / 6).log().float())


@pytest.mark.parametrize("tokens,message", [
    (np.zeros(7, np.int64), "expected a 2-D integer array (sequences, positions), got int64 of shape (7,)"),
    (np.zeros((2, 3), np.float32), "expected a 2-D integer array"),
    (np.full((2, 3), 96), "ids in [96, 96], outside the model's vocabulary [0, 96)"),
], ids=["1-D", "float", "out-of-vocab"])
def test_cli_refuses_a_bad_token_file(capsys, tmp_path, tokens, message):
    save_tiny_llama(tmp_path / "teacher", 32, 1)
    np.save(tmp_path / "tokens.npy", tokens)
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "teacher"), "--tokens", str(tmp_path / "tokens.npy"),
                           "--k", "3", "--out", str(tmp_path / "c"))
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "c").exists()


# ---- the README's offline-teacher example, run as written ----

def readme_section(title):
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    return text.split(f"### {title}", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def code_blocks(section, language):
    return [b.split("\n", 1)[1] for b in section.split("```")[1::2] if b.startswith(language + "\n")]


def test_readme_offline_teacher_example(capsys, tmp_path, monkeypatch, gen):
    """The README's command and training loop, verbatim, on tiny random models in a scratch folder."""
    import shlex

    from fastkd.study.cli import main

    section = readme_section("Offline teacher")
    (command,) = code_blocks(section, "bash")
    (program,) = code_blocks(section, "python")
    monkeypatch.chdir(tmp_path)
    save_tiny_llama(tmp_path / "teacher", 32, 2)
    student = save_tiny_llama(tmp_path / "student", 16, 1, seed=1)
    np.save(tmp_path / "tokens.npy", torch.randint(0, 96, (6, 9), generator=gen).numpy())
    argv = shlex.split(command.strip())
    assert argv[0] == "fastkd" and main([*argv[1:], "--no-progress"]) == 0, capsys.readouterr().err
    before = student.get_output_embeddings().weight.detach().clone()
    scope = {}
    exec(compile(program, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["teacher_ids"].shape == (2, 9, 64)
    assert not torch.equal(scope["student"].get_output_embeddings().weight, before)  # it trained


# ---- the study: fastkd distill --teacher-cache K ... ----

def test_study_adds_one_row_per_cached_k(capsys, tmp_path, monkeypatch):
    import fastkd.study.train
    from fastkd.study.cli import main

    seen = []  # K of every sparse step: the cached students never see the live teacher's logits
    real = fastkd.study.train.sparse_kd_loss
    monkeypatch.setattr(fastkd.study.train, "sparse_kd_loss", lambda s, ids, *a, **k: seen.append(ids.shape[-1])
                        or real(s, ids, *a, **k))
    # the torch backend: under the Triton interpreter (CI) every step would take seconds; the
    # kernels themselves are tested in test_sparse.py
    code = main(["distill", "--no-progress", "--out-dir", str(tmp_path), "--epochs", "1", "--teacher-epochs", "2",
                 "--teacher-cache", "10", "1", "1", "--backend", "torch"])
    printed = capsys.readouterr().out
    assert code == 0
    folder = tmp_path / "digits-s0"
    report = json.loads((folder / "report.json").read_text())
    results = report["results"]
    assert list(results) == ["teacher", "student", "distilled", "distilled-top1", "distilled-top10"]
    assert sorted(set(seen)) == [1, 10] and len(seen) == 2 * 9  # 2 students x 1 epoch x 9 batches
    for key in ("distilled-top1", "distilled-top10"):
        r = results[key]
        assert r["model"] == "mlp-tiny" and r["parameters"] == results["distilled"]["parameters"]
        for metric in ("accuracy", "ece", "nll", "brier", "agreement"):
            assert 0 <= r[metric] <= (2.0 if metric in ("nll", "brier") else 1.0) or metric == "nll", (key, metric)
    # K = V with the tail bucket is the dense teacher up to fp16 storage: the same student comes out
    dense, full = results["distilled"], results["distilled-top10"]
    assert abs(dense["nll"] - full["nll"]) < 1e-2 and abs(dense["accuracy"] - full["accuracy"]) <= 2 / 360
    cache = report["teacher_cache"]
    assert cache["k"] == 10 and cache["tail"] == "bucket" and cache["dtype"] == "float16"
    assert len(TeacherCache(folder / "teacher-cache", rows=1078, vocab=10, k=10)) == 1078
    for text in (printed, (folder / "report.md").read_text()):
        assert "| distilled, top-1 cache | mlp-tiny |" in text and "| distilled, top-10 cache | mlp-tiny |" in text
    assert "sparse_kd_loss" in (folder / "report.md").read_text()
    stages = [json.loads(line)["stage"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("distilled-top1") == stages.count("distilled-top10") == 1


def test_study_distils_from_cache_folders_named_by_their_cache(capsys, tmp_path, monkeypatch, digits):
    """--teacher-cache 3 SAMPLED TOPK: the run's own top-3 and two folders fastkd cache-teacher wrote;
    the sampled student is distilled with teacher_temperature = the cache's T, the top-K ones at 1."""
    import fastkd.study.train
    from fastkd.study.cli import main

    torch.save({"model": digits_teacher().state_dict()}, tmp_path / "teacher.pt")
    for name, kind in (("s8", ["--sample", "8", "--temperature", "4"]), ("k5", ["--k", "5"])):
        code, _, err = run_cli(capsys, "--out", str(tmp_path / name), *kind,
                               "--teacher-ckpt", str(tmp_path / "teacher.pt"))
        assert code == 0, err
    seen = []  # (K, teacher_temperature, logprobs dtype) of every sparse step
    real = fastkd.study.train.sparse_kd_loss
    monkeypatch.setattr(fastkd.study.train, "sparse_kd_loss", lambda s, ids, lp, *a, **k: seen.append(
        (ids.shape[-1], k["teacher_temperature"], lp.dtype)) or real(s, ids, lp, *a, **k))
    code = main(["distill", "--no-progress", "--out-dir", str(tmp_path), "--epochs", "1", "--backend", "torch",
                 "--teacher-ckpt", str(tmp_path / "teacher.pt"),
                 "--teacher-cache", str(tmp_path / "s8"), "3", str(tmp_path / "k5")])
    printed, err = capsys.readouterr()
    assert code == 0, err
    folder = tmp_path / "digits-s0"
    report = json.loads((folder / "report.json").read_text())
    results = report["results"]
    assert list(results) == ["teacher", "student", "distilled", "distilled-top3", "distilled-sampled-S8",
                             "distilled-top5-bucket"]
    assert report["config"]["teacher_cache"] == [3, str(tmp_path / "s8"), str(tmp_path / "k5")]
    assert sorted(set(seen)) == [(3, 1.0, torch.float16), (5, 1.0, torch.float16), (8, 4.0, torch.float32)]
    assert len(seen) == 3 * 9  # 3 students x 1 epoch x 9 batches
    assert all(math.isfinite(results[k]["nll"]) for k in results)
    caches = report["teacher_caches"]
    assert caches["distilled-sampled-S8"]["kind"] == "sampled" and caches["distilled-sampled-S8"]["temperature"] == 4.0
    assert caches["distilled-top5-bucket"]["kind"] == "top_k" and caches["distilled-top5-bucket"]["k"] == 5
    md = (folder / "report.md").read_text()
    for text in (printed, md):
        assert "| distilled, sampled-S8 cache | mlp-tiny |" in text and "| distilled, top5-bucket cache |" in text
        assert "| distilled, top-3 cache |" in text
    assert "8 draws per row from the teacher at T = 4" in md and "`teacher_temperature=4`" in md


def _cache_for_digits(path, digits, *, vocab=10, row_shape=(), rows=None, sha=None, **kind):
    """A cache of random logits shaped like the digits training split (or not, as asked)."""
    rows = len(digits.x_train) if rows is None else rows
    sha = fingerprint(digits.x_train) if sha is None else sha
    with TeacherCacheWriter(path, vocab=vocab, row_shape=row_shape, rows=rows, inputs_sha256=sha,
                            generator=torch.Generator().manual_seed(0) if "samples" in kind else None, **kind) as w:
        w.add_logits(torch.randn(rows, *row_shape, vocab, generator=torch.Generator().manual_seed(1)))
    return path


def _bump_a_count(folder):
    _edit_shard("shard-00000-counts.npy", lambda a: a.__setitem__((1, 0), a[1, 0] + 1))(folder)  # row 1: S + 1


@pytest.mark.parametrize("make,args,message", [
    (None, [], "teacher cache {dir}: no such folder"),
    (dict(samples=8, temperature=2.0), [],
     "{dir}/index.json: sampled at temperature 2, but --temperature is 4; sample again with fastkd cache-teacher "
     "--sample 8 --temperature 4, or distil at --temperature 2"),
    (dict(samples=8, temperature=4.0), ["--policy", "anneal"],
     "{dir}/index.json: sampled at temperature 4, which --policy anneal would change during training; "
     "use --policy constant with a sampled cache"),
    (dict(samples=8, temperature=4.0, rows=359), [], "{dir}/index.json: the cache's rows is 359, expected 1078"),
    (dict(k=3, vocab=12), [], "{dir}/index.json: the cache's vocab is 12, expected 10"),
    (dict(k=3, row_shape=(2,)), [], "{dir}/index.json: the cache's row shape is (2,), expected ()"),
    (dict(samples=8, temperature=4.0, sha="0" * 64), [], "{dir}/index.json: written for other inputs"),
    (dict(samples=8, temperature=4.0, damage=_bump_a_count), [],
     "{dir}/shard-00000-counts.npy: row 1: counts sum to 9, not samples = 8 (index.json)"),
    (dict(samples=8, temperature=4.0, damage=_edit_index(lambda i: i.update(version=3))), [],
     "{dir}/index.json: format version 3; this fastkd reads versions 1, 2; a newer fastkd wrote it"),
    (dict(samples=8, temperature=4.0), ["--divergence", "jsd"], "takes --divergence kl only, got 'jsd'"),
], ids=["missing", "temperature", "policy", "rows", "vocab", "row-shape", "inputs", "counts", "version", "divergence"])
def test_study_refuses_a_cache_folder_that_does_not_fit(capsys, tmp_path, digits, make, args, message):
    from fastkd.study.cli import main

    folder = tmp_path / "cache"
    if make is not None:
        make = dict(make)
        damage = make.pop("damage", None)
        _cache_for_digits(folder, digits, **make)
        if damage is not None:
            damage(folder)
    code = main(["distill", "--no-progress", "--out-dir", str(tmp_path / "runs"), "--teacher-cache", str(folder),
                 *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message.format(dir=folder) in err, err
    assert not (tmp_path / "runs").exists()  # refused before the run wrote anything


@pytest.mark.parametrize("args,message", [
    (["--teacher-cache", "0"], "--teacher-cache values must be >= 1 (entries per row) or cache folders, got 0"),
    (["--teacher-cache", "11"], "--teacher-cache 11: more entries than the 10 classes of digits"),
    (["--teacher-cache", "3", "--divergence", "jsd"], "takes --divergence kl only, got 'jsd'"),
    (["--teacher-cache-tail", "spread"],
     "unknown --teacher-cache-tail 'spread'; choose from bucket, renormalize, lumped"),
], ids=["zero", "above-classes", "divergence", "tail"])
def test_study_bad_teacher_cache_arguments(capsys, tmp_path, args, message):
    from fastkd.study.cli import main

    code = main(["distill", "--no-progress", "--out-dir", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_study_refuses_a_cache_for_augmented_data(capsys, tmp_path):
    from fastkd.study.cli import main
    from test_study import write_tiny_cifar10

    write_tiny_cifar10(tmp_path / "data")
    code = main(["distill", "--no-progress", "--out-dir", str(tmp_path), "--dataset", "cifar10",
                 "--data-dir", str(tmp_path / "data"), "--teacher-cache", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs inputs that repeat exactly; cifar10 is augmented" in err, err
