"""The sampler: greedy parity with transformers, batching, stops, determinism, compile counts,
the logit processors against hand-computed values, and `generate_jsonl` with resume."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from montessori_jax.core import model as M
from montessori_jax.core import text, weights
from montessori_jax.errors import UserError
from montessori_jax.kernels import sampler as S
from montessori_jax.stages import generate as G

GREEDY32 = S.SamplingParams(temperature=0.0, max_new_tokens=32)


def _hf_greedy(tm, prompt, n_new, **kw):
    """transformers' greedy continuation of one prompt (a batch of one), KV cache on."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = tm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny_sampler():
    """A tiny random Llama (tied head) whose prompts all pad to 32 and limits to 32: the tests
    below share a few compiled programs (compiling costs seconds even for a tiny model)."""
    cfg = M.LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        tie_embeddings=True, max_position_embeddings=256)
    return S.Sampler(M.create(cfg, seed=5), pad_id=0, prompt_buckets=(32,), new_token_buckets=(32,))


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    """The shared tiny HF checkpoint (untied head) loaded once: model, tokenizer, Sampler."""
    folder, tm = tiny_checkpoint
    tok = text.load_tokenizer(folder)
    model = weights.load_model(folder)
    return {"model": model, "tokenizer": tok, "sampler": S.Sampler(model, pad_id=tok.pad_token_id), "torch": tm}


# ---------------------------------------------------------------------------------------------
# Greedy parity and batching


def test_greedy_matches_transformers_tiny_tied(tiny_sampler, tmp_path):
    weights.save_hf(M.merge_params(tiny_sampler.graphdef, tiny_sampler.params), str(tmp_path / "m"))
    tm = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    assert tm.config.tie_word_embeddings and tm.generation_config.eos_token_id is None
    prompts = _prompts(64, (5, 13, 29, 2))
    ours = tiny_sampler.generate(prompts, GREEDY32, batch_size=4)  # one batch, left-padded to 32
    for prompt, samples in zip(prompts, ours):
        assert samples[0].tokens == _hf_greedy(tm, prompt, 32)
        assert samples[0].finish_reason == "length"


def test_greedy_matches_transformers_tiny_untied(ckpt):
    tm, tok, sampler = ckpt["torch"], ckpt["tokenizer"], ckpt["sampler"]
    prompts = _prompts(tm.config.vocab_size, (5, 13, 29, 2))
    eos = tm.config.eos_token_id
    ours = sampler.generate(prompts, GREEDY32, [eos], batch_size=4)
    for prompt, samples in zip(prompts, ours):
        theirs = _hf_greedy(tm, prompt, 32, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        assert samples[0].tokens == theirs
        assert samples[0].finish_reason == ("stop" if theirs[-1] == eos else "length")


@pytest.mark.slow  # ~80 s: transformers from the GGUF, 96 of its greedy steps, our 30-layer compile
def test_greedy_matches_transformers_smollm2(smollm2_jax, smollm2_torch, smollm2_tok):
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Give me two tips for learning to cook."]
    prompts = [text.encode_prompt(smollm2_tok, q) for q in questions]
    stops, pad = text.stop_token_ids(smollm2_tok), smollm2_tok.pad_token_id
    ours = S.Sampler(smollm2_jax, pad_id=pad).generate(prompts, GREEDY32, stops)
    for prompt, samples in zip(prompts, ours):
        theirs = _hf_greedy(smollm2_torch, prompt, 32, eos_token_id=stops, pad_token_id=pad)
        assert samples[0].tokens == theirs
        assert samples[0].finish_reason == ("stop" if theirs[-1] in stops else "length")
    # the known answer, stopped at <|im_end|>
    first = ours[0][0]
    assert first.finish_reason == "stop" and first.tokens[-1] == smollm2_tok.eos_token_id
    assert smollm2_tok.decode(first.tokens[:-1]) == "The capital of France is Paris."


def test_batch_equals_batches_of_one(tiny_sampler):
    prompts = _prompts(64, (1, 7, 17, 30))
    params = S.SamplingParams(temperature=0.0, max_new_tokens=16)
    batched = tiny_sampler.generate(prompts, params, batch_size=4)
    for prompt, samples in zip(prompts, batched):
        alone = tiny_sampler.generate([prompt], params, batch_size=1)
        assert samples[0].tokens == alone[0][0].tokens


def test_n_samples_share_one_prefill(tiny_sampler):
    prompts = _prompts(64, (9, 4, 12, 1))
    greedy = tiny_sampler.generate(prompts, S.SamplingParams(temperature=0.0, max_new_tokens=12, n=3))
    one = tiny_sampler.generate(prompts, S.SamplingParams(temperature=0.0, max_new_tokens=12))
    for g, o in zip(greedy, one):
        assert [s.tokens for s in g] == [o[0].tokens] * 3
    hot = tiny_sampler.generate(prompts, S.SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=1))
    for samples in hot:
        assert len({tuple(s.tokens) for s in samples}) > 1


def test_same_decode_rows_from_other_prompt_counts(tiny_sampler):
    # 1 prompt x n=2 and 2 prompts x n=1 both decode 2 rows, but hold 1 and 2 prompt caches:
    # the second once ran the first's compiled program and failed on the cache's shape
    prompts = _prompts(64, (5, 9))
    two = tiny_sampler.run_batch(prompts[:1], S.SamplingParams(temperature=0.0, max_new_tokens=6, n=2))
    ones = tiny_sampler.run_batch(prompts, S.SamplingParams(temperature=0.0, max_new_tokens=6))
    first = [t[:6].tolist() for t in (two.tokens[0], two.tokens[1], ones.tokens[0])]
    assert first[0] == first[1] == first[2]
    assert ones.tokens[1][:6].tolist() == tiny_sampler.run_batch(prompts[1:], GREEDY32).tokens[0][:6].tolist()


# ---------------------------------------------------------------------------------------------
# Stop ids, limits, determinism, compilations


def test_stop_id_ends_row_and_pads_after(tiny_sampler):
    prompts = _prompts(64, (6, 11, 3, 20))
    params = S.SamplingParams(temperature=0.0, max_new_tokens=16)
    free = tiny_sampler.run_batch(prompts, params)
    assert free.steps == 16 and not free.stopped.any() and (free.num_tokens == 16).all()
    row0 = free.tokens[0, :16].tolist()
    k = next(i for i in range(2, 16) if row0[i] not in row0[:i])  # a first occurrence
    stop = row0[k]

    out = tiny_sampler.run_batch(prompts, params, stop_ids=[stop])
    for r in range(len(prompts)):
        ref = free.tokens[r, :16].tolist()
        n = ref.index(stop) + 1 if stop in ref else 16
        assert out.num_tokens[r] == n and out.stopped[r] == (stop in ref)
        assert out.tokens[r, :n].tolist() == ref[:n]
        assert (out.tokens[r, n:] == tiny_sampler.pad_id).all()  # padded after the stop
    assert out.num_tokens[0] == k + 1 and out.stopped[0]
    samples = out.samples(len(prompts), 1)
    assert samples[0][0].finish_reason == "stop" and samples[0][0].tokens[-1] == stop

    # every row stops at its first token: the loop ends at once
    firsts = sorted({int(t) for t in free.tokens[:, 0]})
    early = tiny_sampler.run_batch(prompts, params, stop_ids=firsts)
    assert early.steps == 1 and early.stopped.all() and (early.num_tokens == 1).all()


def test_token_limit_within_a_bucket(tiny_sampler):
    prompts = _prompts(64, (5, 8, 2, 3))
    for limit in (1, 9, 16):
        out = tiny_sampler.generate(prompts, S.SamplingParams(temperature=0.7, max_new_tokens=limit))
        assert all(len(s[0].tokens) == limit and s[0].finish_reason == "length" for s in out)


def test_fixed_seed_and_batch_give_same_tokens(tiny_sampler):
    prompts = _prompts(64, (5, 12, 30, 8))
    params = S.SamplingParams(temperature=1.0, top_p=0.9, top_k=20, presence_penalty=0.3, max_new_tokens=16,
                              n=3, seed=7)
    a = tiny_sampler.generate(prompts, params)
    b = tiny_sampler.generate(prompts, params)
    c = tiny_sampler.generate(prompts, dataclasses.replace(params, seed=8))
    toks = lambda r: [[s.tokens for s in row] for row in r]  # noqa: E731
    assert toks(a) == toks(b)
    assert toks(a) != toks(c)
    # a sample's keys depend on (seed, row id, sample index), not on the batch around it
    others = _prompts(64, (3, 21, 9), seed=1)
    mixed = tiny_sampler.generate(others[:2] + [prompts[1]] + others[2:], params, row_ids=[10, 11, 1, 12])
    assert toks(mixed)[2] == toks(a)[1]


def test_top_k_1_equals_greedy(tiny_sampler):
    prompts = _prompts(64, (4, 10, 1, 13))
    greedy = tiny_sampler.generate(prompts, S.SamplingParams(temperature=0.0, max_new_tokens=16))
    top1 = tiny_sampler.generate(prompts, S.SamplingParams(temperature=1.3, top_k=1, max_new_tokens=16, seed=3))
    assert [g[0].tokens for g in greedy] == [t[0].tokens for t in top1]


def test_presence_penalty_in_the_loop(tiny_sampler):
    prompts = _prompts(64, (4, 10, 1, 13))
    plain = tiny_sampler.generate(prompts, S.SamplingParams(temperature=0.0, max_new_tokens=16))
    assert any(len(set(s[0].tokens)) < 16 for s in plain)  # greedy repeats itself here...
    penalised = tiny_sampler.generate(
        prompts, S.SamplingParams(temperature=0.0, presence_penalty=1e4, max_new_tokens=16))
    assert all(len(set(s[0].tokens)) == 16 for s in penalised)  # ...and cannot with the penalty


def test_compiles_once_per_bucket(tiny_sampler):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, rng.integers(1, 60)).tolist() for _ in range(40)]
    before = tiny_sampler.num_compiled
    out = tiny_sampler.generate(prompts, S.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=10),
                                batch_size=4)
    assert all(len(s[0].tokens) == 10 for s in out)
    # 10 batches of 4 over prompt buckets 32 and 64: at most one (prefill, decode) pair each
    added = tiny_sampler.num_compiled - before
    assert added in (0, 2, 4)
    assert {k[2] for k in tiny_sampler.programs if k[0] == "prefill"} >= {32, 64}
    assert tiny_sampler.num_traces == tiny_sampler.num_compiled  # nothing was traced twice
    # another limit in the bucket, seed, temperature, top-k and top-p, greedy: no new program
    n = tiny_sampler.num_compiled
    tiny_sampler.generate(prompts, S.SamplingParams(temperature=1.1, top_k=5, top_p=0.5, max_new_tokens=13, seed=4),
                          batch_size=4)
    tiny_sampler.generate(prompts, S.SamplingParams(temperature=0.0, max_new_tokens=3), batch_size=4)
    assert tiny_sampler.num_compiled == n and tiny_sampler.num_traces == n


# ---------------------------------------------------------------------------------------------
# Logit processing on fixed logits, against hand-computed kept sets and probabilities

LOGITS = np.array([[2.0, 1.0, 0.5, 0.0, -1.0]], np.float32)


def _probs(processed):
    return np.asarray(jax.nn.softmax(processed, axis=-1))[0]


def _expected(kept: dict[int, float], V: int):
    """Renormalised probabilities over the kept tokens, from their (transformed) logits."""
    z = sum(math.exp(v) for v in kept.values())
    out = np.zeros(V)
    for i, v in kept.items():
        out[i] = math.exp(v) / z
    return out


def test_presence_penalty_subtracts_once_per_seen_token():
    seen = np.array([[True, False, False, True, False]])
    out = np.asarray(S.apply_presence_penalty(LOGITS, seen, 0.75))
    np.testing.assert_array_equal(out, [[1.25, 1.0, 0.5, -0.75, -1.0]])
    out = np.asarray(S.apply_presence_penalty(LOGITS, seen, -0.5))
    np.testing.assert_array_equal(out, [[2.5, 1.0, 0.5, 0.5, -1.0]])


def test_temperature():
    np.testing.assert_allclose(np.asarray(S.apply_temperature(LOGITS, 0.5)), LOGITS * 2, rtol=0, atol=0)
    probs = _probs(S.apply_temperature(LOGITS, 2.0))
    np.testing.assert_allclose(probs, _expected({i: v / 2 for i, v in enumerate(LOGITS[0])}, 5), rtol=1e-6)


@pytest.mark.parametrize("k, kept", [(1, {0}), (2, {0, 1}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3, 4}),
                                     (9, {0, 1, 2, 3, 4})])
def test_top_k_kept_set(k, kept):
    probs = _probs(S.top_k_filter(LOGITS, k))
    np.testing.assert_allclose(probs, _expected({i: LOGITS[0, i] for i in kept}, 5), rtol=1e-6, atol=1e-7)


# probs of LOGITS: 0.5630, 0.2071, 0.1256, 0.0762, 0.0280; mass before each: 0, .563, .770, .896, .972
@pytest.mark.parametrize("p, kept", [(0.3, {0}), (0.5, {0}), (0.6, {0, 1}), (0.75, {0, 1}), (0.8, {0, 1, 2}),
                                     (0.9, {0, 1, 2, 3}), (0.98, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_kept_set(p, kept):
    probs = _probs(S.top_p_filter(LOGITS, p))
    np.testing.assert_allclose(probs, _expected({i: LOGITS[0, i] for i in kept}, 5), rtol=1e-6, atol=1e-7)


def test_top_p_rows_and_ties():
    logits = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, -np.inf, 0.0, -np.inf]], np.float32)
    out = np.asarray(S.top_p_filter(logits, 0.2))
    # row 0: the two tied leaders are both kept (a tie with the last kept token stays)
    np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, True], [True, False, False, False]])


def test_processing_order_penalty_temperature_top_k_top_p():
    logits = np.array([[3.0, 2.5, 1.0, 0.2, -0.5, 2.9]], np.float32)
    seen = np.array([[True, False, False, True, False, False]])
    out = S.process_logits(logits, seen, temperature=0.5, top_k=4, top_p=0.85, presence_penalty=1.0)
    # penalty: [2.0, 2.5, 1.0, -0.8, -0.5, 2.9]; temperature 0.5: [4, 5, 2, -1.6, -1, 5.8]
    # top-4: {5, 1, 0, 2}, renormalised .611 .274 .101 .014; top-p .85: mass before 0 is .885 -> {5, 1}
    np.testing.assert_allclose(_probs(out), _expected({5: 5.8, 1: 5.0}, 6), rtol=1e-5, atol=1e-7)


def test_greedy_tokens_first_max():
    logits = np.array([[0.0, 2.0, 2.0, 1.0], [-np.inf, -1.0, -3.0, -2.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(S.greedy_tokens(logits)), [1, 1])


def test_categorical_from_uniform_inverts_the_cdf():
    # probabilities .1 .2 .3 .4 at spread-out ids of a 1000-token vocab (several CDF blocks)
    V, ids = 1000, [3, 300, 700, 999]
    logits = np.full((1, V), -np.inf, np.float32)
    logits[0, ids] = np.log([0.1, 0.2, 0.3, 0.4])
    cases = [(0.0, 3), (0.05, 3), (0.099, 3), (0.101, 300), (0.29, 300), (0.31, 700), (0.59, 700),
             (0.61, 999), (0.9999, 999), (float(np.float32(1 - 2**-24)), 999)]
    u = np.array([c[0] for c in cases], np.float32)
    out = S.categorical_from_uniform(np.repeat(logits, len(cases), 0), u)
    assert np.asarray(out).tolist() == [c[1] for c in cases]


def _knobs(**kw):
    base = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "presence_penalty": 0.0}
    base.update(kw)
    return {k: jnp.asarray(v, jnp.int32 if k == "top_k" else jnp.float32) for k, v in base.items()}


N_DRAWS = 40_000  # frequencies must be within 4.5 binomial standard deviations of the truth


def _check_frequencies(tokens, expected, removed):
    counts = np.bincount(np.asarray(tokens), minlength=len(expected))
    freq = counts / N_DRAWS
    tol = 4.5 * np.sqrt(expected * (1 - expected) / N_DRAWS)
    assert counts[removed].sum() == 0
    assert (np.abs(freq - expected) <= tol).all(), (freq, expected, tol)


def test_draw_frequencies_through_the_step():
    """40,000 rows through the engine's step function (penalty, temperature, top-k, top-p,
    per-row keys, the draw) on a 4-token vocabulary."""
    logits = np.array([[1.0, 0.5, 0.0, -0.5]], np.float32)
    seen = np.array([[False, True, False, False]])
    knobs = _knobs(temperature=0.7, top_k=3, top_p=0.97, presence_penalty=0.25)
    # hand: penalty -> [1, .25, 0, -.5]; /0.7; top-3 drops token 3; probs .486 .228 .286: all in top-p
    expected = _expected({0: 1.0 / 0.7, 1: 0.25 / 0.7, 2: 0.0}, 4)
    processed = S.process_logits(logits, seen, temperature=0.7, top_k=3, top_p=0.97, presence_penalty=0.25)
    np.testing.assert_allclose(_probs(processed), expected, rtol=1e-5, atol=1e-7)

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(N_DRAWS))
    step = jax.jit(S._sample_step)
    tokens = step(jnp.repeat(jnp.asarray(logits), N_DRAWS, 0), jnp.repeat(jnp.asarray(seen), N_DRAWS, 0),
                  keys, 5, knobs)
    _check_frequencies(tokens, expected, [3])


def test_draw_frequencies_across_cdf_blocks():
    """The two-level inverse-CDF draw on a 700-token vocabulary with mass in three blocks."""
    V, ids = 700, [5, 255, 256, 699]
    logits = np.full((1, V), -np.inf, np.float32)
    logits[0, ids] = [1.0, 0.5, 0.0, -0.5]
    processed = S.process_logits(logits, None, temperature=0.7, top_k=3)
    expected = _expected({5: 1.0 / 0.7, 255: 0.5 / 0.7, 256: 0.0}, V)
    np.testing.assert_allclose(_probs(processed), expected, rtol=1e-5, atol=1e-7)
    u = jax.random.uniform(jax.random.key(1), (N_DRAWS,))
    tokens = jax.jit(S.categorical_from_uniform)(jnp.repeat(processed, N_DRAWS, 0), u)
    _check_frequencies(tokens, expected, [i for i in range(V) if i not in ids[:3]])


def test_sampling_params_validation():
    with pytest.raises(UserError, match="top_p"):
        S.SamplingParams(top_p=0.0)
    with pytest.raises(UserError, match="temperature"):
        S.SamplingParams(temperature=-1)
    with pytest.raises(UserError, match="n="):
        S.SamplingParams(n=0)


def test_prompt_errors(tiny_sampler):
    with pytest.raises(UserError, match="prompt 1 is empty"):
        tiny_sampler.generate([[1, 2], []], GREEDY32)
    with pytest.raises(UserError, match="context"):
        tiny_sampler.generate([[1] * 250], GREEDY32)
    with pytest.raises(UserError, match="outside the vocabulary"):
        tiny_sampler.generate([[1, 64]], GREEDY32)


# ---------------------------------------------------------------------------------------------
# JSONL in and out, resume


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_generate_jsonl_and_resume(ckpt, tmp_path):
    rows = [{"id": "a", "prompt": "the cat sat"}, {"prompt": "a dog ran in the park"},
            {"id": 7, "messages": [{"role": "user", "content": "the sun is warm"}]}]
    inp = _write(tmp_path / "in.jsonl", rows)
    out = str(tmp_path / "out.jsonl")
    params = S.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, n=2, seed=3)
    run = lambda: G.generate_jsonl(ckpt["model"], out, params, input_path=inp, batch_size=2,  # noqa: E731
                                   tokenizer=ckpt["tokenizer"], sampler=ckpt["sampler"], progress=False)
    s = run()
    first = _read(out)
    assert s["written"] == 6 and s["skipped"] == 0 and s["tokens"] == sum(r["num_tokens"] for r in first)
    assert sorted((json.dumps(r["id"]), r["sample"]) for r in first) == sorted(
        (json.dumps(i), j) for i in ("a", 1, 7) for j in (0, 1))
    for r in first:
        assert set(r) == {"id", "sample", "text", "num_tokens", "finish_reason"}
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 12
        assert r["finish_reason"] == "stop" or r["num_tokens"] == 12

    # a kill mid-write: two rows gone and the one before them cut in half
    lines = open(out).read().splitlines(keepends=True)
    with open(out, "w") as f:
        f.write("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    s = run()
    assert s["skipped"] == 3 and s["written"] == 3
    again = _read(out)
    assert len(again) == 6 and sorted(map(json.dumps, again)) == sorted(map(json.dumps, first))

    # complete: a rerun writes nothing
    s = run()
    assert s["written"] == 0 and len(_read(out)) == 6


def test_generate_jsonl_single_prompt_from_path(tiny_checkpoint, tmp_path):
    folder, tm = tiny_checkpoint
    out = str(tmp_path / "one.jsonl")
    params = S.SamplingParams(temperature=0.0, max_new_tokens=5)
    s = G.generate_jsonl(folder, out, params, prompt="the cat", chat_template=False, progress=False)
    (row,) = _read(out)
    assert row["id"] == 0 and row["sample"] == 0 and row["num_tokens"] <= 5
    assert s["compiled_programs"] == 2
    # the same tokens as transformers' greedy continuation of the plain text
    tok = text.load_tokenizer(folder)
    prompt = text.encode_text(tok, "the cat").tolist()
    theirs = _hf_greedy(tm, prompt, 5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert row["num_tokens"] == len(theirs)
    assert row["text"] == tok.decode(theirs[:-1] if theirs[-1] == tok.eos_token_id else theirs,
                                     skip_special_tokens=True)


def test_generate_jsonl_bad_input(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    params = S.SamplingParams(max_new_tokens=4)
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "{not json", {"prompt": "x"}])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        G.generate_jsonl(folder, str(tmp_path / "o.jsonl"), params, input_path=bad, progress=False)
    neither = _write(tmp_path / "neither.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(UserError, match=r"neither\.jsonl:2: a row needs 'prompt'"):
        G.generate_jsonl(folder, str(tmp_path / "o.jsonl"), params, input_path=neither, progress=False)
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match="need the chat template"):
        G.generate_jsonl(folder, str(tmp_path / "o.jsonl"), params, input_path=chat, chat_template=False,
                         progress=False)
    outp = tmp_path / "corrupt.jsonl"
    outp.write_text('{"id": 0, "sample": 0}\ngarbage\n{"id": 1, "sample": 0}\n')
    with pytest.raises(UserError, match=r"corrupt\.jsonl:2"):
        G.generate_jsonl(folder, str(outp), params, prompt="hi", progress=False)


# ---------------------------------------------------------------------------------------------
# The benchmark's code path (not its timings)


def test_bench_generate_runs_side_by_side(tiny_checkpoint, tmp_path):
    from montessori_jax.bench import generate as bg

    folder, _ = tiny_checkpoint
    result = bg.bench_generate(folder, batch_sizes=(2,), max_new_tokens=8, repeats=1, progress=None)
    (row,) = result["results"]
    assert row["batch"] == 2 and row["new_tokens"] == 16  # fixed length: no stop ids on either side
    assert row["greedy_agreement"] == 1.0
    assert row["ratio"] == pytest.approx(row["ours_tok_s"] / row["hf_tok_s"])
    assert result["compiled_programs"] == 2 and result["machine"]["cpu_count"] >= 1
    table = bg.format_table(result)
    assert "transformers tok/s" in table and "compiled programs: 2" in table
    from montessori_jax.files import write_json_atomic

    write_json_atomic(str(tmp_path / "b.json"), result)
    assert json.load(open(tmp_path / "b.json"))["results"][0]["batch"] == 2
