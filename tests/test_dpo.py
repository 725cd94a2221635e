"""DPO: the loss against hand-computed values, sequence log-probs against transformers, cached
reference = live reference, one step raises the margin, accumulation, sharded = unsharded, the
reference cache (reuse, completion, rebuild), and the stage (outputs, resume)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from montessori_jax.config import DPOOptimConfig
from montessori_jax.core import model as M
from montessori_jax.core import optim, sharding, text, weights
from montessori_jax.kernels import dpo as dpo_lib
from montessori_jax.kernels import train_step
from montessori_jax.stages import dpo

CFG = M.LlamaConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
LOG2 = math.log(2.0)


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _pairs(n, seed=0, vocab=96):
    """Random pairs: a shared prompt of 3-10 tokens, answers of 2-15 tokens (all targets)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(2, vocab, rng.randint(3, 11))
        rows = []
        for _side in range(2):
            answer = rng.randint(2, vocab, rng.randint(2, 16))
            tokens = np.concatenate([prompt, answer]).astype(np.int32)
            rows.append(text.Example(tokens, np.arange(len(tokens)) >= len(prompt)))
        out.append(dpo_lib.PairExample(*rows))
    return out


def _ref(logps_fn, params, pairs, tmp_path, name="ref.jsonl"):
    c, r, _ = dpo.reference_logps(str(tmp_path / name), {"fingerprint": "test"}, pairs, logps_fn, params, 4, 0)
    return c, r


def _tx(lr=1e-3, steps=10):
    return optim.adamw(DPOOptimConfig(lr=lr, warmup_ratio=0.0, stable_ratio=1.0, decay_ratio=0.0), steps)


@pytest.fixture(scope="module")
def steps():
    """One set of jitted functions for CFG, shared so that tests with equal shapes compile once
    (a train step takes ~10 s to compile on a busy 2-core machine)."""
    graphdef, _ = M.split_params(M.create(CFG))
    tx = _tx()
    return {"graphdef": graphdef, "tx": tx, "cached": dpo_lib.make_train_step(graphdef, tx, 0.1),
            "live": dpo_lib.make_train_step(graphdef, tx, 0.1, live_reference=True),
            "logps": dpo_lib.make_logps_fn(graphdef)}


# --- the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_loss_against_hand_computed_values(beta):
    pc, pr = np.array([-10.0, -20.0, -5.0, -7.0]), np.array([-12.0, -15.0, -5.0, -9.0])
    rc, rr = np.array([-11.0, -18.0, -6.0, -7.0]), np.array([-11.5, -16.0, -4.0, -9.0])
    # (pc - rc) - (pr - rr): 1.5 (chosen gained), -3 (rejected gained), 2, 0 (policy = reference)
    margins = [1.5, -3.0, 2.0, 0.0]
    expected = [-math.log(1.0 / (1.0 + math.exp(-beta * m))) for m in margins]
    assert expected[3] == pytest.approx(LOG2) and expected[1] > LOG2 > expected[0]
    (s, c), (rw_c, rw_r) = dpo_lib.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta)
    assert float(c) == 4 and float(s) == pytest.approx(sum(expected), rel=1e-6)
    np.testing.assert_allclose(rw_c, beta * (pc - rc), rtol=1e-6)
    np.testing.assert_allclose(rw_r, beta * (pr - rr), rtol=1e-6)
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0])
    (s, c), _ = dpo_lib.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta, mask)
    assert float(c) == 3 and float(s) == pytest.approx(expected[0] + expected[1] + expected[3], rel=1e-6)


# --- sequence log-probs against transformers --------------------------------------------------


def _torch_pair_logps(tm, tok, prompt, answers, max_prompt_len, max_len):
    """log p(answer | prompt) of both answers from transformers, the token boundary found from the
    chat template and TRL's keep_end rule written out here; with the prompt's whole length."""
    import torch

    msgs = [{"role": "user", "content": prompt}]
    p_ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
    answer_ids = []
    for answer in answers:
        f_ids = tok(tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False),
                    add_special_tokens=False)["input_ids"]
        assert f_ids[:len(p_ids)] == p_ids and f_ids[-1] == tok.eos_token_id
        answer_ids.append(f_ids[len(p_ids):])
    longer = max(map(len, answer_ids))
    kept = p_ids[-max_prompt_len:] if len(p_ids) + longer > max_len else p_ids
    if len(kept) + longer > max_len:
        answer_ids = [a[:max_len - max_prompt_len] for a in answer_ids]
    out = []
    for a in answer_ids:
        ids = kept + a
        with torch.no_grad():
            logits = tm(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        out.append((float(logp[len(kept) - 1:].sum()), len(a)))
    return out


# Under the tiny checkpoint's tokenizer the prompts are 90 and 87 tokens, the answers 7 and 3,
# and 12 and 4 (each with its end of turn). (6, 24): both prompts are cut to 6 and the answers fit;
# (6, 14): the second pair is still 6 + 12 > 14, so its answers keep their first 14 - 6 = 8.
@pytest.mark.parametrize("max_prompt_len, max_len, prompts_cut, answers_cut",
                         [(128, 256, [False, False], [False, False]), (6, 24, [True, True], [False, False]),
                          (6, 14, [True, True], [False, True])])
def test_sequence_logps_equal_transformers(tiny_checkpoint, max_prompt_len, max_len, prompts_cut, answers_cut):
    folder, tm = tiny_checkpoint
    tok = text.load_tokenizer(folder)
    graphdef, params = M.split_params(weights.load_model(folder))
    items = [("the cat sat on the mat", "a dog ran in the park", "the sun"),
             ("a dog ran", "the sun is warm today and the cat sat", "mat mat mat")]
    pairs = [dpo_lib.encode_pair(tok, p, c, r, max_prompt_len=max_prompt_len, max_len=max_len) for p, c, r in items]
    batch = dpo_lib.make_batch(pairs, [0, 1], 2, 2, tok.pad_token_id)
    ours = np.asarray(dpo_lib.policy_logps(graphdef, params, jax.tree.map(lambda x: x[0], batch)))
    counts = batch["loss_mask"][0].sum(-1)
    for i, (prompt, chosen, rejected) in enumerate(items):
        want = _torch_pair_logps(tm, tok, prompt, (chosen, rejected), max_prompt_len, max_len)
        for row, (logp, n_answer) in zip((i, 2 + i), want):
            assert counts[row] == n_answer  # the answer (and its end of turn when kept); no prompt token
            assert abs(ours[row] - logp) <= 1e-4 * max(1.0, abs(logp)), (row, ours[row], logp)
        assert pairs[i].prompt_truncated == prompts_cut[i] and pairs[i].answers_truncated == answers_cut[i]
        assert pairs[i].truncated == (prompts_cut[i] or answers_cut[i])


def test_long_answer_is_cut_to_max_len(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    tok = text.load_tokenizer(folder)
    long = " ".join(["the cat sat on the mat"] * 20)
    p = dpo_lib.encode_pair(tok, "a dog", long, "the sun", max_prompt_len=8, max_len=24)
    assert p.truncated and len(p.chosen) == 24 and p.chosen.loss_mask[-1]
    assert len(p.rejected) < 24 and not p.rejected.loss_mask[:len(p.rejected) - 3].all()


# --- truncation, counted by hand ----------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tok():
    """One token per word: under its template a prompt of n words is n + 3 tokens (<|user|>, the
    words, </s>, <|assistant|>), an answer of n words n + 1 targets (the words, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<s>", "</s>", "<|user|>", "<|assistant|>", "[UNK]"] + [f"w{i}" for i in range(40)]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    return tok


def _words(lo, hi):
    return " ".join(f"w{i}" for i in range(lo, hi))


def _ids(tok, *words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def test_truncation_pair_that_fits_is_kept_whole(word_tok):
    # prompt 10 words: 13 tokens; answers 4 and 6 words: 5 and 7; 13 + 7 = 20, not over 20
    p = dpo_lib.encode_pair(word_tok, _words(0, 10), _words(10, 14), _words(20, 26), max_prompt_len=8, max_len=20)
    prompt = _ids(word_tok, "<|user|>", *_words(0, 10).split(), "</s>", "<|assistant|>")
    assert p.chosen.tokens.tolist() == prompt + _ids(word_tok, *_words(10, 14).split(), "</s>")
    assert p.rejected.tokens.tolist() == prompt + _ids(word_tok, *_words(20, 26).split(), "</s>")
    assert len(p.chosen) == 18 and len(p.rejected) == 20 and len(p) == 20
    assert p.chosen.loss_mask.tolist() == [False] * 13 + [True] * 5
    assert p.rejected.loss_mask.tolist() == [False] * 13 + [True] * 7
    assert not p.prompt_truncated and not p.answers_truncated and not p.truncated


def test_truncation_prompt_keeps_its_end_when_the_row_is_too_long(word_tok):
    # the same pair with max_len 19: 13 + 7 > 19, so the prompt keeps its last 8 tokens
    # (w4..w9, </s>, <|assistant|>); 8 + 7 = 15 fits, so both answers stay whole
    p = dpo_lib.encode_pair(word_tok, _words(0, 10), _words(10, 14), _words(20, 26), max_prompt_len=8, max_len=19)
    prompt = _ids(word_tok, *_words(4, 10).split(), "</s>", "<|assistant|>")
    assert p.chosen.tokens.tolist() == prompt + _ids(word_tok, *_words(10, 14).split(), "</s>")
    assert p.rejected.tokens.tolist() == prompt + _ids(word_tok, *_words(20, 26).split(), "</s>")
    assert len(p.chosen) == 13 and len(p.rejected) == 15
    assert p.chosen.loss_mask.tolist() == [False] * 8 + [True] * 5
    assert p.rejected.loss_mask.tolist() == [False] * 8 + [True] * 7
    assert p.prompt_truncated and not p.answers_truncated


def test_truncation_prompt_and_answers_cut(word_tok):
    # prompt 13 tokens, answers 5 and 13; max_len 16: 13 + 13 > 16, the prompt keeps 8; 8 + 13 > 16,
    # so each answer keeps its first 16 - 8 = 8 tokens: the short one whole, the long one without </s>
    p = dpo_lib.encode_pair(word_tok, _words(0, 10), _words(10, 14), _words(20, 32), max_prompt_len=8, max_len=16)
    prompt = _ids(word_tok, *_words(4, 10).split(), "</s>", "<|assistant|>")
    assert p.chosen.tokens.tolist() == prompt + _ids(word_tok, *_words(10, 14).split(), "</s>")
    assert p.rejected.tokens.tolist() == prompt + _ids(word_tok, *_words(20, 28).split())
    assert len(p.chosen) == 13 and len(p.rejected) == 16
    assert p.rejected.loss_mask.tolist() == [False] * 8 + [True] * 8
    assert p.prompt_truncated and p.answers_truncated
    # a prompt of 4 words (7 tokens, under max_prompt_len) is not cut, yet 7 + 13 > 16: the answers
    # still keep only 16 - 8 = 8 tokens, and the row is 15 long, as TRL leaves it
    p = dpo_lib.encode_pair(word_tok, _words(0, 4), _words(10, 14), _words(20, 32), max_prompt_len=8, max_len=16)
    assert p.rejected.tokens.tolist() == _ids(word_tok, "<|user|>", *_words(0, 4).split(), "</s>", "<|assistant|>",
                                              *_words(20, 28).split())
    assert len(p.chosen) == 12 and len(p.rejected) == 15
    assert not p.prompt_truncated and p.answers_truncated


# --- the step -----------------------------------------------------------------------------------


def test_cached_reference_equals_live_reference(steps, tmp_path):
    _, ref_params = M.split_params(M.create(CFG, seed=0))
    _, policy = M.split_params(M.create(CFG, seed=1))
    pairs = _pairs(6, seed=1)
    ref = _ref(steps["logps"], ref_params, pairs, tmp_path)
    again = _ref(steps["logps"], ref_params, pairs, tmp_path)  # read back from the file
    np.testing.assert_array_equal(ref[0], again[0])
    np.testing.assert_array_equal(ref[1], again[1])
    tx = steps["tx"]
    batch = dpo_lib.make_batch(pairs, [0, 2, 4, 5], 4, 4, 0, ref)
    s_cached, m_cached = steps["cached"](train_step.init_state(_copy(policy), tx), batch)
    s_live, m_live = steps["live"](train_step.init_state(_copy(policy), tx), batch, ref_params)
    assert abs(float(m_cached["loss"]) - LOG2) > 1e-3  # policy != reference
    for k in m_cached:
        assert float(m_cached[k]) == pytest.approx(float(m_live[k]), rel=1e-6, abs=1e-6), k
    for k in policy:
        np.testing.assert_allclose(s_cached["params"][k], s_live["params"][k], rtol=0, atol=1e-7)


def test_one_step_raises_the_margin(steps):
    _, params = M.split_params(M.create(CFG, seed=2))
    pairs = _pairs(4, seed=3)
    batch = dpo_lib.make_batch(pairs, range(4), 4, 4, 0)
    lp = np.asarray(steps["logps"](params, batch))
    batch = dpo_lib.make_batch(pairs, range(4), 4, 4, 0, (lp[:4], lp[4:]))
    state, m = steps["cached"](train_step.init_state(_copy(params), steps["tx"]), batch)  # lr 1e-3
    # policy = reference: every reward is 0, the loss log 2, no pair yet ranked right
    assert float(m["loss"]) == pytest.approx(LOG2, abs=1e-6)
    assert float(m["rewards/margin"]) == 0.0 and float(m["rewards/accuracy"]) == 0.0
    after = np.asarray(steps["logps"](state["params"], batch))
    margins = 0.1 * ((after[:4] - lp[:4]) - (after[4:] - lp[4:]))
    assert margins.mean() > 0.01 and (margins > 0).all(), margins
    state, m2 = steps["cached"](state, batch)
    assert float(m2["rewards/margin"]) == pytest.approx(margins.mean(), rel=1e-4)
    assert float(m2["loss"]) < LOG2 and float(m2["rewards/accuracy"]) == 1.0


def test_accumulation_equals_one_big_batch(steps):
    _, params = M.split_params(M.create(CFG, seed=4))
    pairs = _pairs(4, seed=5)
    ref = (np.asarray([-30.0, -40.0, -35.0, -20.0], np.float32), np.asarray([-31.0, -38.0, -36.0, -22.0], np.float32))
    tx, step = steps["tx"], steps["cached"]
    # 3 real pairs: the last micro-batch is half padding, which must not count
    s1, m1 = step(train_step.init_state(_copy(params), tx), dpo_lib.make_batch(pairs, [0, 1, 2], 4, 4, 0, ref))
    s2, m2 = step(train_step.init_state(_copy(params), tx), dpo_lib.make_batch(pairs, [0, 1, 2], 4, 2, 0, ref))
    assert float(m1["pairs"]) == float(m2["pairs"]) == 3
    for k in m1:
        assert float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5, abs=1e-6), k
    mu1, _, _ = optim.adam_moments(s1["opt_state"])
    mu2, _, _ = optim.adam_moments(s2["opt_state"])
    for k in params:
        np.testing.assert_allclose(mu1[k], mu2[k], rtol=1e-4, atol=1e-9)


def test_sharded_equals_unsharded(steps, tmp_path):
    _, params = M.split_params(M.create(CFG, seed=6))
    _, ref_params = M.split_params(M.create(CFG, seed=7))
    pairs = _pairs(4, seed=8)
    ref = _ref(steps["logps"], ref_params, pairs, tmp_path)
    tx, step = steps["tx"], steps["cached"]
    batch = dpo_lib.make_batch(pairs, range(4), 4, 4, 0, ref)
    s_one, m_one = step(train_step.init_state(_copy(params), tx), batch)

    mesh = sharding.mesh_from_config(2, 2, 2)
    shardings = sharding.dict_shardings(params, M.logical_axes(CFG), mesh)

    def put(b):
        return jax.device_put(b, train_step.batch_shardings(mesh, sharding.DEFAULT_RULES, b))

    with jax.set_mesh(mesh):
        ref_sharded = dpo.reference_logps(str(tmp_path / "sharded.jsonl"), {"fingerprint": "s"}, pairs,
                                          steps["logps"], jax.device_put(_copy(ref_params), shardings), 4, 0, put)
        state = train_step.init_state(jax.device_put(_copy(params), shardings), tx)
        b = put(batch)
        assert b["tokens"].sharding.spec[1] == ("data", "fsdp")  # the 8 rows split over 4 devices
        state, m = step(state, b)
    np.testing.assert_allclose(ref_sharded[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(ref_sharded[1], ref[1], rtol=1e-5)
    assert state["params"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for k in m_one:
        assert float(m[k]) == pytest.approx(float(m_one[k]), rel=1e-5, abs=1e-6), k
    mu, _, _ = optim.adam_moments(state["opt_state"])
    mu_one, _, _ = optim.adam_moments(s_one["opt_state"])
    for k in params:
        a, b_ = np.asarray(mu[k]), np.asarray(mu_one[k])
        assert np.abs(a - b_).max() <= 1e-5 * np.abs(b_).max(), k


# --- held-out pairs ---------------------------------------------------------------------------


def test_split_pairs_rule():
    assert dpo_lib.split_pairs(6, 0.0, 0) == (list(range(6)), [])
    assert dpo_lib.split_pairs(1, 0.5, 0) == ([0], [])  # nothing left to train on otherwise
    # n_eval = round(fraction * n), at least 1, at most n - 1
    for n, fraction, n_eval in [(2, 0.25, 1), (4, 0.25, 1), (6, 0.25, 2), (6, 0.34, 2), (8, 0.25, 2),
                                (4, 0.9, 3), (3, 0.1, 1)]:
        train, held = dpo_lib.split_pairs(n, fraction, seed=0)
        assert len(held) == n_eval, (n, fraction)
        assert sorted(train + held) == list(range(n)) and train == sorted(train) and held == sorted(held)
    assert dpo_lib.split_pairs(10, 0.3, 5) == dpo_lib.split_pairs(10, 0.3, 5)  # by seed
    assert dpo_lib.split_pairs(10, 0.3, 5)[1] != dpo_lib.split_pairs(10, 0.3, 6)[1]


def test_heldout_eval_at_the_reference_then_after_training(steps, tmp_path):
    _, params = M.split_params(M.create(CFG, seed=11))
    pairs = _pairs(4, seed=12)
    ref = _ref(steps["logps"], params, pairs, tmp_path)  # as the stage: the cache, 4 pairs a forward
    eval_fn = dpo_lib.make_eval_fn(steps["graphdef"])
    held = [pairs[1]]
    held_ref = (ref[0][[1]], ref[1][[1]])
    # policy = reference: every reward 0, so the loss is log 2, the margin 0 and no pair ranked right
    for batch_pairs, micro in ((2, 1), (4, 4)):
        for ps, r in ((held, held_ref), (pairs, ref)):
            before = dpo_lib.evaluate_pairs(eval_fn, params, ps, r, 0.1, batch_pairs, micro, 0)
            assert before["loss"] == pytest.approx(LOG2, abs=1e-6)
            assert before["margin"] == 0.0 and before["reward_accuracy"] == 0.0
            # the stage's held-out reference: the log-probs in the evaluation's own layout, so the
            # rewards are exactly 0 whatever layout the cache was computed in
            lp = dpo_lib.pair_logps(eval_fn, params, ps, batch_pairs, micro, 0)
            assert dpo_lib.evaluate_pairs(eval_fn, params, ps, lp, 0.1, batch_pairs, micro, 0) == {
                "loss": pytest.approx(LOG2, abs=1e-7), "reward_accuracy": 0.0, "margin": 0.0}
            np.testing.assert_allclose(lp[0], r[0], rtol=1e-5)
    # train on all four (the held-out pair among them) at lr 1e-3: its margin rises
    state = train_step.init_state(_copy(params), steps["tx"])
    batch = dpo_lib.make_batch(pairs, range(4), 4, 4, 0, ref)
    for _ in range(3):
        state, _ = steps["cached"](state, batch)
    after = dpo_lib.evaluate_pairs(eval_fn, state["params"], held, held_ref, 0.1, 2, 1, 0)
    lp = np.asarray(steps["logps"](state["params"], dpo_lib.make_batch(held, [0], 1, 1, 0)), np.float64)
    want = 0.1 * ((lp[0] - held_ref[0][0]) - (lp[1] - held_ref[1][0]))
    assert after["margin"] == pytest.approx(want, rel=1e-4) and after["margin"] > 0.01
    assert after["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-want))), rel=1e-4)
    assert after["loss"] < LOG2 and after["reward_accuracy"] == 1.0


# --- the reference cache ----------------------------------------------------------------------


def test_reference_cache_reused_completed_and_rebuilt(steps, tmp_path):
    _, params = M.split_params(M.create(CFG, seed=9))
    pairs = _pairs(10, seed=10)
    fn = steps["logps"]
    calls = []

    def counting(p, b):
        calls.append(int(b["pair_mask"].sum()) // 2)
        return fn(p, b)

    path = str(tmp_path / "cache.jsonl")
    header = {"fingerprint": "abc", "n_pairs": 10}
    c, r, status = dpo.reference_logps(path, header, pairs, counting, params, 4, 0)
    assert status == "computed" and calls == [4, 4, 2]
    calls.clear()
    c2, r2, status = dpo.reference_logps(path, header, pairs, counting, params, 4, 0)
    assert status == "reused" and calls == [] and (c2 == c).all() and (r2 == r).all()
    # a kill mid-write: the last rows gone and the last line cut in half
    lines = open(path).readlines()
    with open(path, "w") as f:
        f.writelines(lines[:-3])
        f.write(lines[-3][:10])
    c3, r3, status = dpo.reference_logps(path, header, pairs, counting, params, 4, 0)
    assert status == "completed" and calls == [3]
    np.testing.assert_array_equal(c3, c)
    np.testing.assert_array_equal(r3, r)
    assert len(open(path).readlines()) == 11
    calls.clear()
    _, _, status = dpo.reference_logps(path, {"fingerprint": "other"}, pairs, counting, params, 4, 0)
    assert status == "computed" and sum(calls) == 10


# --- the stage --------------------------------------------------------------------------------

WORDS = "the cat sat on the mat a dog ran in the park sun is warm today".split()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rng = np.random.RandomState(0)
    d = tmp_path_factory.mktemp("dpo_pairs")

    def s(lo, hi):
        return " ".join(rng.choice(WORDS, rng.randint(lo, hi)))

    rows = [{"prompt": s(4, 12), "chosen": s(2, 10), "rejected": s(2, 10), "chosen_id": f"c{i}",
             "rejected_id": f"r{i}", "chosen_influence": 0.1, "rejected_influence": -0.1} for i in range(6)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _args(folder, pairs_dir, out, *extra):
    return ["dpo", "--out", str(out), f"teacher.path={folder}", f"dpo.pairs={pairs_dir}", "dpo.optim.lr=1e-3",
            "dpo.epochs=2", "dpo.save_every=3", "dpo.max_prompt_len=16", "dpo.max_len=48", *extra]


def _final_params(out):
    from montessori_jax.core.checkpoint import Checkpoints

    ck = Checkpoints(os.path.join(out, "checkpoints"))
    step = ck.latest_step()
    restored = ck._mngr.restore(step)
    ck.close()
    return step, restored["state"]["params"]


def test_stage_outputs_reuse_and_resume(tiny_checkpoint, pairs_file, tmp_path, capsys, monkeypatch):
    from montessori_jax.cli import main

    folder, _ = tiny_checkpoint
    full = tmp_path / "full"
    assert main(_args(folder, pairs_file, full)) == 0
    printed = capsys.readouterr().out
    assert "6 steps on 6 pairs" in printed and "reference log-probs computed" in printed
    summary = json.load(open(full / "summary.json"))
    caches = sorted(p.name for p in pairs_file.iterdir() if p.name.startswith("ref_logps-"))
    assert len(caches) == 1 and summary["reference"]["cache"].endswith(caches[0])
    rows = [json.loads(line) for line in open(full / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "lr"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["loss"] == pytest.approx(LOG2, abs=1e-5)  # the first step starts at the reference
    assert rows[-1]["rewards/margin"] > 0 and rows[-1]["loss"] < LOG2
    assert (full / "dpo.png").stat().st_size > 0
    exported = weights.load_model(str(full / "model"))
    _, ckpt_params = _final_params(str(full))
    np.testing.assert_array_equal(np.asarray(M.split_params(exported)[1]["wq"]), np.asarray(ckpt_params["wq"]))

    # a rerun on the finished folder trains nothing and reuses the cache
    assert main(_args(folder, pairs_file, full)) == 0
    assert "6 steps" in capsys.readouterr().out
    assert json.load(open(full / "summary.json"))["reference"]["status"] == "reused"

    # a crash after the checkpoint at step 3 (step 4 was logged); the rerun continues from step 3
    cut = tmp_path / "cut"
    real, calls = dpo_lib.make_batch, []

    def crash_on_sixth(*a, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated kill")
        return real(*a, **kw)

    monkeypatch.setattr(dpo_lib, "make_batch", crash_on_sixth)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main(_args(folder, pairs_file, cut))
    monkeypatch.setattr(dpo_lib, "make_batch", real)
    assert [json.loads(line)["step"] for line in open(cut / "metrics.jsonl")] == [1, 2, 3, 4]
    assert main(_args(folder, pairs_file, cut)) == 0
    assert [json.loads(line)["step"] for line in open(cut / "metrics.jsonl")] == list(range(1, 7))
    step_full, p_full = _final_params(str(full))
    step_cut, p_cut = _final_params(str(cut))
    assert step_full == step_cut == 6
    for k in p_full:
        np.testing.assert_array_equal(np.asarray(p_full[k]), np.asarray(p_cut[k]))

    # other settings in the same folder are refused
    assert main(_args(folder, pairs_file, cut, "dpo.beta=0.2")) == 2
    assert "holds a DPO run with other pairs" in capsys.readouterr().err


def test_stage_heldout_pairs_and_resume_settings(tiny_checkpoint, pairs_file, tmp_path, capsys, monkeypatch):
    from montessori_jax.cli import main

    folder, _ = tiny_checkpoint
    out = tmp_path / "held"
    # 6 pairs, round(0.34 * 6) = 2 held out: 4 train, 2 a step, 2 epochs
    assert main(_args(folder, pairs_file, out, "dpo.eval_fraction=0.34")) == 0
    printed = capsys.readouterr().out
    assert "4 steps on 4 pairs (2 held out)" in printed and "held out, before training: loss 0.6931" in printed
    # every prompt (about 90 tokens under the fallback template) is over 48 - its answer: cut to 16
    assert "truncated: 6 of 6 pairs lost the start of their prompt (dpo.max_prompt_len), 0 the end" in printed
    summary = json.load(open(out / "summary.json"))
    held = summary["heldout"]
    assert summary["pairs"] == 6 and summary["train_pairs"] == 4 and held["pairs"] == 2
    assert held["before"]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert held["before"]["margin"] == 0.0 and held["before"]["reward_accuracy"] == 0.0
    assert all(math.isfinite(v) for v in held["after"].values()) and held["after"] != held["before"]
    record = json.load(open(out / "heldout.json"))
    assert record["after_step"] == 4 and len(record["indices"]) == 2 and len(record["reference"]["chosen"]) == 2

    # a rerun after completion keeps both measurements and computes neither again
    def no_eval(*a, **kw):
        raise AssertionError("held-out pairs evaluated again")

    monkeypatch.setattr(dpo_lib, "evaluate_pairs", no_eval)
    assert main(_args(folder, pairs_file, out, "dpo.eval_fraction=0.34")) == 0
    assert json.load(open(out / "summary.json"))["heldout"] == held
    capsys.readouterr()
    # max_steps and eval_fraction are part of the run: a change is refused, naming the key
    assert main(_args(folder, pairs_file, out, "dpo.eval_fraction=0.34", "dpo.max_steps=3")) == 2
    assert "dpo.max_steps None -> 3" in capsys.readouterr().err
    assert main(_args(folder, pairs_file, out, "dpo.eval_fraction=0.5")) == 2
    assert "dpo.eval_fraction 0.34 -> 0.5" in capsys.readouterr().err
    assert summary["prompts_truncated"] == 6 and summary["answers_truncated"] == 0


def test_fingerprint_covers_pairs_weights_template_and_lengths(tiny_checkpoint, pairs_file, tmp_path):
    import shutil
    import types

    from montessori_jax.config import DPOConfig

    folder, _ = tiny_checkpoint
    tok = text.load_tokenizer(folder)
    rows = [json.loads(line) for line in open(pairs_file / "pairs.jsonl")]
    dcfg = DPOConfig(max_prompt_len=16, max_len=48)

    def fp(pairs_path=str(pairs_file / "pairs.jsonl"), model=folder, dtype="float32", tok_=tok, cfg=dcfg):
        enc = [dpo_lib.encode_pair(tok, r["prompt"], r["chosen"], r["rejected"], cfg.system, cfg.max_prompt_len,
                               cfg.max_len) for r in rows]
        return dpo.reference_fingerprint(pairs_path, model, "float32", dtype, tok_, cfg, enc)["fingerprint"]

    base = fp()
    assert fp() == base
    edited = tmp_path / "pairs.jsonl"
    edited.write_text(open(pairs_file / "pairs.jsonl").read() + "\n")
    other_model = tmp_path / "model"
    shutil.copytree(folder, other_model)
    st = next(p for p in other_model.iterdir() if p.suffix == ".safetensors")
    data = bytearray(st.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    st.write_bytes(bytes(data))
    template = types.SimpleNamespace(chat_template=tok.chat_template + " ")
    changed = [fp(pairs_path=str(edited)), fp(model=str(other_model)), fp(dtype="bfloat16"), fp(tok_=template),
               fp(cfg=DPOConfig(max_prompt_len=16, max_len=40)), fp(cfg=DPOConfig(max_prompt_len=8, max_len=48)),
               fp(cfg=DPOConfig(max_prompt_len=16, max_len=48, system="be brief"))]
    assert len({base, *changed}) == 1 + len(changed)
    # training settings do not change what the reference computes
    assert fp(cfg=DPOConfig(max_prompt_len=16, max_len=48, beta=0.5, batch_size=4)) == base


def test_stage_without_pairs_is_an_error(tiny_checkpoint, tmp_path, capsys):
    from montessori_jax.cli import main

    folder, _ = tiny_checkpoint
    (tmp_path / "pairs.jsonl").write_text("")
    assert main(["dpo", "--out", str(tmp_path / "o"), f"teacher.path={folder}", f"dpo.pairs={tmp_path}"]) == 2
    assert "no pairs" in capsys.readouterr().err
