"""`montessori plan`: its byte counts for a tiny config against numbers computed by hand, the
mesh, the verdicts, --json, and one-line errors."""

import json

import pytest

from montessori_jax.cli import main
from montessori_jax.config import Config, load_config
from montessori_jax.errors import UserError
from montessori_jax.stages import plan as plan_lib

# the "tiny" shape: vocab 512, d_model 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), ffn 128, untied
#   embed 512*64 = 32768, head 64*512 = 32768, final norm 64,
#   per layer: wq 64*4*16 = 4096, wk = wv = 64*2*16 = 2048 each, wo 4096, 3 * 64*128 = 24576, 2 norms 128
#   = 36992; two layers 73984. Total 32768 + 32768 + 64 + 73984 = 139584.
TINY_PARAMS = 139584
# on fsdp=2 every weight splits its `embed` axis in two; the norms (2*64 + 2*64 + 64 = 320) stay whole
TINY_PARAMS_FSDP2 = (TINY_PARAMS - 320) // 2 + 320


def _cfg(*overrides):
    return load_config(Config, None, ["synthesis.batch_size=8", "synthesis.samples_per_prompt=1",
                                      "synthesis.instruction_sampling.max_new_tokens=16",
                                      "synthesis.response_sampling.max_new_tokens=16", *overrides])


def _stage(result, name):
    return next(p for p in result["stages"] if p["stage"] == name)


def test_plan_bytes_match_hand_counts():
    result = plan_lib.plan(_cfg(), devices=2, device_bytes=2**30, shapes={"teacher": "tiny", "student": "tiny"},
                           prompt_len=64)
    assert result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert result["models"]["student"]["params"] == TINY_PARAMS
    assert result["models"]["student"]["params_per_device"] == TINY_PARAMS_FSDP2
    sft = _stage(result, "sft")
    assert sft["params"] == TINY_PARAMS_FSDP2 * 4  # fp32
    assert sft["opt_state"] == 2 * TINY_PARAMS_FSDP2 * 4  # AdamW mu and nu
    assert sft["grads"] == 2 * TINY_PARAMS_FSDP2 * 4  # accumulator + one micro-batch's
    assert sft["rows"] == 4  # sft.batch_size 8 over data x fsdp = 2
    # the sampler: params by the rules; KV caches [L, Bp, P, K, E] (prompts) and [L, B, M, K, E] (rows)
    # x (k, v) in fp32 + one valid flag per slot; one sample per prompt here, so Bp = B and P + M = S
    syn = _stage(result, "synthesis")
    assert syn["params"] == TINY_PARAMS_FSDP2 * 4
    S = 64 + 64  # prompt bucket 64 + new-token bucket 64 (16 new tokens round up to the first bucket)
    assert syn["other"]["kv_cache"] == 2 * 2 * 8 * S * 2 * 16 * 4 + 8 * S
    # bf16 params halve params and AdamW state; a bf16 compute dtype halves the cache
    half = plan_lib.plan(_cfg("student.param_dtype=bfloat16", "teacher.dtype=bfloat16"), 2, 2**30,
                         {"teacher": "tiny", "student": "tiny"}, 64)
    assert _stage(half, "sft")["opt_state"] == 2 * TINY_PARAMS_FSDP2 * 2
    assert _stage(half, "synthesis")["other"]["kv_cache"] == 2 * 2 * 8 * S * 2 * 16 * 2 + 8 * S
    # 4 samples per prompt: 2 prompts' caches of P = 64 slots, shared, and 64 slots for each of the 8 rows
    four = plan_lib.plan(_cfg("synthesis.samples_per_prompt=4"), 2, 2**30, {"teacher": "tiny", "student": "tiny"}, 64)
    assert _stage(four, "synthesis")["other"]["kv_cache"] == (2 * 2 * 2 * 64 * 2 * 16 * 4 + 2 * 64) + (
        2 * 2 * 8 * 64 * 2 * 16 * 4 + 8 * 64)
    # data=2 splits the sampler's 8 rows: 4 per device, the whole model on each
    split = plan_lib.plan(_cfg("mesh.data=2"), 2, 2**30, {"teacher": "tiny", "student": "tiny"}, 64)
    assert split["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert _stage(split, "synthesis")["params"] == TINY_PARAMS * 4
    assert _stage(split, "synthesis")["other"]["kv_cache"] == 2 * 2 * 4 * S * 2 * 16 * 4 + 4 * S


def test_plan_verdicts_and_mesh_errors():
    shapes = {"teacher": "tiny", "student": "tiny"}
    roomy = plan_lib.plan(_cfg(), 1, 8 * 2**30, shapes, 64)
    assert all(p["fits"] for p in roomy["stages"]), [p["verdict"] for p in roomy["stages"]]
    # 8 MiB: params + AdamW + grads (5 x 0.56 MB) fit, a 1024-token micro-batch of 8 rows does not
    tight = plan_lib.plan(_cfg("sft.max_len=1024", "student.remat=false"), 1, 8 * 2**20, shapes, 64)
    sft = _stage(tight, "sft")
    assert not sft["fits"] and ("remat" in sft["verdict"] or "micro_batch_size" in sft["verdict"])
    tiny_dev = plan_lib.plan(_cfg(), 1, 2**20, shapes, 64)
    assert "raise fsdp" in _stage(tiny_dev, "sft")["verdict"]
    with pytest.raises(Exception, match="do not divide"):
        plan_lib.plan(_cfg("mesh.tensor=3"), 4, 2**30, shapes, 64)


def test_plan_model_shape_by_name_and_unknown(tmp_path):
    cfg = _cfg("teacher.path=models/Meta-Llama-3-8B-Instruct", "student.path=/nowhere/TinyLlama_v1.1")
    t, where = plan_lib.model_shape(cfg.teacher, "teacher")
    assert (t.n_layers, t.d_model, t.vocab_size) == (32, 4096, 128256) and "llama3-8b" in where
    s, _ = plan_lib.model_shape(cfg.student, "student")
    assert (s.n_layers, s.d_model) == (22, 2048)
    with pytest.raises(UserError, match="student.path=/nowhere/mystery: .*--model-shape student=NAME"):
        plan_lib.model_shape(_cfg("student.path=/nowhere/mystery").student, "student")
    assert plan_lib.parse_bytes("80GB") == 80 * 2**30 == plan_lib.parse_bytes("80GiB")
    with pytest.raises(UserError, match="--device-memory"):
        plan_lib.parse_bytes("lots")


def test_plan_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--devices", "2", "--device-memory", "1GB", "--model-shape", "tiny", "--prompt-len", "64",
               "--json", str(out), "student.path=x", "teacher.path=x"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mesh data=1 fsdp=2 tensor=1" in text and "influence" in text and "fits" in text
    result = json.loads(out.read_text())
    assert _stage(result, "warmup")["params"] == TINY_PARAMS_FSDP2 * 4
    assert main(["plan", "--devices", "2", "--model-shape", "tiny"]) == 2
    assert "--device-memory" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["tiny-sft", "tiny-sft-remat", "tiny-exact", "tiny-first-order"])
def test_plan_within_20_percent_of_xlas_own_account(case):
    """The plan's total for a stage against XLA's buffer assignment of that stage's compiled
    program on the tiny shape (arguments + outputs + temporaries - aliased), the number the
    measured peaks of docs/plan.md track within a few percent."""
    from montessori_jax.bench import plan_check

    r = plan_check.run_case(case)
    assert r["xla_bytes"] > 0
    assert 0.8 <= r["plan_bytes"] / r["xla_bytes"] <= 1.2, (r["plan_bytes"], r["xla_bytes"])
