"""SFT: AdamW parity with PyTorch, exact accumulation, packing, the schedule, resume after a
kill, and the sharded step."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import tiny_torch_llama

from montessori_jax.config import OptimConfig
from montessori_jax.core import batching, optim, sharding, text, weights
from montessori_jax.core import model as M
from montessori_jax.kernels import train_step

CFG = M.LlamaConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


def _examples(n, seed=0, vocab=96):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        length = rng.randint(6, 30)
        mask = np.zeros(length, bool)
        mask[rng.randint(2, length - 1):] = True  # a response at the end
        out.append(text.Example(rng.randint(2, vocab, length).astype(np.int32), mask))
    return out


def _batch(examples, micro, length=32):
    rows = batching.rows_from_examples(examples)
    return batching.global_batch(rows, list(range(len(rows))), len(rows), micro, (length,), pad_id=0)


def _params(seed=0, cfg=CFG):
    return M.split_params(M.create(cfg, seed=seed))


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_adamw_three_steps_match_torch(tmp_path):
    tm = tiny_torch_llama(seed=5, vocab_size=96)
    tm.save_pretrained(tmp_path)
    graphdef, params = M.split_params(weights.load_model(str(tmp_path)))
    ocfg = OptimConfig(lr=3e-3, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, warmup_ratio=0.4,
                       stable_ratio=0.2, decay_ratio=0.4, min_lr_ratio=0.1, grad_clip=0.5)
    n_steps = 3
    tx = optim.adamw(ocfg, n_steps)
    step = train_step.make_train_step(graphdef, tx)
    state = train_step.init_state(params, tx)
    batches = [_batch(_examples(3, seed=s), micro=3) for s in range(n_steps)]

    decay = [p for n, p in tm.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in tm.named_parameters() if "norm" in n]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": ocfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=ocfg.lr, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps)
    schedule = optim.wsd_schedule(ocfg, n_steps)
    for i, b in enumerate(batches):
        state, metrics = step(state, b)
        tokens = torch.tensor(b["tokens"][0], dtype=torch.long)
        labels = torch.where(torch.tensor(b["loss_mask"][0]), tokens, torch.full_like(tokens, -100))
        out = tm(tokens, attention_mask=torch.tensor(b["segment_ids"][0]), labels=labels)
        topt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), ocfg.grad_clip)
        for g in topt.param_groups:
            g["lr"] = float(schedule(i))
        topt.step()
        assert abs(float(metrics["loss"]) - out.loss.item()) <= 1e-5
        assert float(metrics["lr"]) == pytest.approx(float(schedule(i)))
    ours = M.merge_params(graphdef, state["params"])
    theirs = tmp_path / "after"
    tm.save_pretrained(theirs)
    ref = weights.load_model(str(theirs))
    for name in M.Llama.LAYER_PARAMS + ("embed", "final_norm", "lm_head"):
        diff = np.abs(np.asarray(getattr(ours, name)[...]) - np.asarray(getattr(ref, name)[...])).max()
        assert diff <= 1e-5, (name, diff)
    # the params really moved (lr 3e-3 for 3 steps), so the comparison above has teeth
    start = weights.load_model(str(tmp_path))
    assert np.abs(np.asarray(ours.wq[...]) - np.asarray(start.wq[...])).max() > 1e-3


def test_accumulation_equals_one_big_batch():
    """2 micro-batches of 2 give the same loss and gradient as one batch of 4. Compared through
    SGD with lr 1, where the params move by exactly -gradient (Adam's first step divides g by
    |g| + eps and would amplify float rounding of near-zero gradients). A wrong normalisation
    (a mean of per-micro-batch means) is off by far more: see the next test."""
    graphdef, params = _params()
    import optax

    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    step = train_step.make_train_step(graphdef, tx)
    ex = _examples(4, seed=1)
    s1, m1 = step(train_step.init_state(_copy(params), tx), _batch(ex, micro=4))
    s2, m2 = step(train_step.init_state(_copy(params), tx), _batch(ex, micro=2))
    assert float(m1["tokens"]) == float(m2["tokens"]) == sum(e.loss_mask.sum() for e in ex)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6
    assert float(m1["grad_norm"]) > 0.1
    for k in params:
        g1 = np.asarray(params[k]) - np.asarray(s1["params"][k])
        g2 = np.asarray(params[k]) - np.asarray(s2["params"][k])
        # fp32 sums in another order: measured at most 1.1e-6 of each gradient's scale
        assert np.abs(g1 - g2).max() <= 1e-5 * np.abs(g1).max(), k


def test_token_mean_is_over_the_global_batch_not_a_mean_of_means():
    graphdef, params = _params()
    tx = optim.adamw(OptimConfig(), 10)
    step = train_step.make_train_step(graphdef, tx)
    ex = _examples(4, seed=2)
    _, m = step(train_step.init_state(_copy(params), tx), _batch(ex, micro=2))
    per_ex = []
    for e in ex:
        b = _batch([e], micro=1)
        logits = M.apply(graphdef, params, b["tokens"][0], b["positions"][0], b["segment_ids"][0])
        from montessori_jax.core.losses import token_nll

        s, c = token_nll(logits, b["tokens"][0], b["loss_mask"][0])
        per_ex.append((float(s[0]), float(c[0])))
    expected = sum(s for s, _ in per_ex) / sum(c for _, c in per_ex)
    assert abs(float(m["loss"]) - expected) <= 1e-5
    mean_of_means = np.mean([s / c for s, c in per_ex])
    assert abs(expected - mean_of_means) > 1e-3  # the two differ here, so the test can tell


def test_packed_loss_equals_unpacked():
    graphdef, params = _params()
    ex = _examples(5, seed=3)
    packed = batching.pack_examples(ex, max_len=64)
    assert len(packed) < len(ex)
    for r in packed:  # segments numbered 1..k in order within each row
        ids = np.unique(r.segment_ids)
        assert list(ids) == list(range(1, len(ids) + 1)) and np.all(np.diff(r.segment_ids) >= 0)
    from montessori_jax.core.losses import batch_token_nll

    def loss(rows, length):
        b = batching.pad_rows(rows, len(rows), length, 0)
        logits = M.apply(graphdef, params, b["tokens"], b["positions"], b["segment_ids"])
        s, c = batch_token_nll(logits, b["tokens"], b["loss_mask"])
        return float(s) / float(c)

    assert abs(loss(packed, 64) - loss(batching.rows_from_examples(ex), 32)) <= 1e-5


def test_wsd_schedule_shape():
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.2, stable_ratio=0.4, decay_ratio=0.4, min_lr_ratio=0.1)
    lrs = [float(optim.wsd_schedule(cfg, 10)(i)) for i in range(10)]
    np.testing.assert_allclose(lrs, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1], atol=1e-6)
    ramp = OptimConfig(lr=5e-6, warmup_ratio=1.0, stable_ratio=0.0, decay_ratio=0.0)
    assert float(optim.wsd_schedule(ramp, 4)(3)) == pytest.approx(5e-6)  # ends at the peak
    assert float(optim.wsd_schedule(ramp, 4)(0)) == pytest.approx(1.25e-6)


def test_sharded_step_equals_single_device():
    cfg = CFG.replace(d_model=64, n_heads=8, n_kv_heads=4, ffn_dim=96)
    graphdef, params = _params(cfg=cfg)
    tx = optim.adamw(OptimConfig(lr=1e-3), 10)
    step = train_step.make_train_step(graphdef, tx)
    batch = _batch(_examples(8, seed=4), micro=4)
    ref_state, ref_m = step(train_step.init_state(_copy(params), tx), batch)
    mesh = sharding.mesh_from_config(2, 2, 2)
    shardings = sharding.dict_shardings(params, M.logical_axes(cfg), mesh)
    placed = jax.device_put(_copy(params), shardings)
    with jax.set_mesh(mesh):
        state = train_step.init_state(placed, tx)
        b = jax.device_put(batch, train_step.batch_shardings(mesh, sharding.DEFAULT_RULES, batch))
        state, m = step(state, b)
    assert state["params"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert abs(float(m["loss"]) - float(ref_m["loss"])) <= 1e-5
    # Adam's first moment after one step is (1 - b1) * g: the gradients agree. (The params
    # after a first Adam step are lr * g / (|g| + eps), which amplifies rounding where g ~ 0.)
    mu, _, count = optim.adam_moments(state["opt_state"])
    ref_mu, _, _ = optim.adam_moments(ref_state["opt_state"])
    assert int(count) == 1 and mu["wq"].sharding.spec == state["params"]["wq"].sharding.spec
    for k in params:
        a, b = np.asarray(mu[k]), np.asarray(ref_mu[k])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), k
        moved = np.abs(np.asarray(state["params"][k]) - np.asarray(ref_state["params"][k])).max()
        assert moved <= 0.1 * 1e-3, k  # within a tenth of one lr-sized step (measured: 1.4%)


# --- the stage: resume after a kill -------------------------------------------------------------


def _write_data(path, n=24, seed=0):
    words = "the cat sat on the mat a dog ran in the park sun is warm today".split()
    rng = np.random.RandomState(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": " ".join(rng.choice(words, rng.randint(2, 8))),
                                "response": " ".join(rng.choice(words, rng.randint(1, 12)))}) + "\n")


def _sft_cmd(folder, data, out, extra=()):
    return [sys.executable, "-m", "montessori_jax.cli", "sft", "--out", str(out), f"student.path={folder}",
            f"sft.data={data}", "sft.batch_size=2", "sft.epochs=2", "sft.save_every=4", "sft.log_every=1",
            "sft.optim.lr=1e-3", "sft.export=false", "mesh.fsdp=1", *extra]


def _final_params(out):
    from montessori_jax.core.checkpoint import Checkpoints

    meta = json.loads(open(os.path.join(out, "warm_state.json")).read())
    ck = Checkpoints(meta["checkpoint"])
    state = ck._mngr.restore(ck.latest_step())
    ck.close()
    return meta, state["state"]["params"] if "state" in state else state


def test_resume_after_kill_equals_uninterrupted(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    data = tmp_path / "data.jsonl"
    _write_data(data, n=12)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    full = tmp_path / "full"
    subprocess.run(_sft_cmd(folder, data, full), check=True, env=env, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_sft_cmd(folder, data, cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    ckdir = cut / "checkpoints"
    while time.time() < deadline and not (ckdir.exists() and any(p.name.isdigit() for p in ckdir.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "warm_state.json").exists(), "killed before the end"
    subprocess.run(_sft_cmd(folder, data, cut), check=True, env=env, capture_output=True)

    meta_full, p_full = _final_params(str(full))
    meta_cut, p_cut = _final_params(str(cut))
    assert meta_full["step"] == meta_cut["step"] == 12
    for k in p_full:
        np.testing.assert_array_equal(np.asarray(p_full[k]), np.asarray(p_cut[k]))
    steps = [json.loads(line)["step"] for line in open(cut / "metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 13))  # no step lost or logged twice


def test_changed_max_steps_on_rerun_is_refused_naming_the_key(tiny_checkpoint, tmp_path, capsys):
    from montessori_jax.cli import main

    folder, _ = tiny_checkpoint
    data = tmp_path / "data.jsonl"
    _write_data(data, n=8)
    out = tmp_path / "out"
    args = [a for a in _sft_cmd(folder, data, out)[3:] if a != "mesh.fsdp=1"]  # in this process: 8 devices
    assert main(args + ["sft.max_steps=2"]) == 0
    assert json.load(open(out / "summary.json"))["steps"] == 2
    assert main(args + ["sft.max_steps=2"]) == 0  # the same settings: finished, nothing to do
    capsys.readouterr()
    assert main(args + ["sft.max_steps=3"]) == 2
    assert "holds a run with other data or settings (changed: sft.max_steps 2 -> 3)" in capsys.readouterr().err
