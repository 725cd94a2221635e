"""Multi-turn `messages` rows: every assistant turn (and its end-of-turn token) is scored, by
`montessori score` and by the eval stage's reference NLL, against transformers' logits."""

import json

import numpy as np
import pytest
import torch

from montessori_jax.config import Config, load_config
from montessori_jax.core import text
from montessori_jax.errors import UserError
from montessori_jax.stages import eval as ev
from montessori_jax.stages import score as scoring

CONVERSATION = [
    {"role": "user", "content": "the cat sat"},
    {"role": "assistant", "content": "on the mat"},
    {"role": "user", "content": "and the dog"},
    {"role": "assistant", "content": "a dog ran in the park"},
]


def _hf_tok(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = text.LLAMA3_DEFAULT_TEMPLATE  # the tiny tokenizer ships none
    return tok


def _turn_nlls(tm, hf_tok, messages):
    """(sum, count) of the NLL of each assistant turn, by transformers alone: the conversation
    rendered up to each turn, its pieces tokenized, the model's log-softmax read at each turn."""
    def render(msgs, gen):
        return hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)

    ids, spans, done = [], [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, through = render(messages[:k], True), render(messages[: k + 1], False)
        ids += hf_tok(head[len(done):], add_special_tokens=False).input_ids
        turn = hf_tok(through[len(head):], add_special_tokens=False).input_ids
        assert turn[-1] == hf_tok.eos_token_id  # this template ends a turn with eos
        spans.append((len(ids), len(ids) + len(turn)))
        ids += turn
        done = through
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(tm(x).logits[0].double(), dim=-1)
    out = []
    for a, b in spans:
        nll = -logp[torch.arange(a - 1, b - 1), x[0, a:b]]
        out.append((float(nll.sum()), b - a))
    return out


def test_encode_conversation_masks_every_assistant_turn(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    tok = text.load_tokenizer(folder)
    ex = text.encode_conversation(tok, CONVERSATION)
    assert tok.decode(ex.tokens[ex.loss_mask]) == "on the mat</s>a dog ran in the park</s>"
    last = text.encode_conversation(tok, CONVERSATION, turns="last")
    assert np.array_equal(last.tokens, ex.tokens)
    assert tok.decode(last.tokens[last.loss_mask]) == "a dog ran in the park</s>"
    # a pair's prompt given as messages: only its answer is a target (what sft trains on)
    pair = text.encode_example(tok, CONVERSATION[:3], CONVERSATION[3]["content"])
    assert np.array_equal(pair.tokens, last.tokens) and np.array_equal(pair.loss_mask, last.loss_mask)
    with pytest.raises(UserError, match="at least one assistant turn"):
        text.encode_conversation(tok, CONVERSATION[:1])


def test_score_messages_row_is_the_sum_over_turns(tiny_checkpoint, tmp_path):
    folder, tm = tiny_checkpoint
    rows = [{"id": "two", "messages": CONVERSATION}, {"id": "one", "messages": CONVERSATION[:2]}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = scoring.score_file(folder, str(inp), str(tmp_path / "out.jsonl"), batch_size=2)
    got = [json.loads(line) for line in open(tmp_path / "out.jsonl")]

    turns = _turn_nlls(tm, _hf_tok(folder), CONVERSATION)
    (s1, n1), (s2, n2) = turns
    assert got[0]["id"] == "two" and got[0]["tokens"] == n1 + n2
    assert got[0]["nll"] == pytest.approx((s1 + s2) / (n1 + n2), abs=2e-5)
    assert got[1]["tokens"] == n1 and got[1]["nll"] == pytest.approx(s1 / n1, abs=2e-5)
    assert summary["tokens"] == 2 * n1 + n2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATION[:3]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl, line 1: the last message must be the assistant"):
        scoring.score_file(folder, str(bad), str(tmp_path / "o2.jsonl"))


def test_eval_reference_nll_of_messages_rows(tiny_checkpoint, tmp_path):
    folder, tm = tiny_checkpoint
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n"
                    + json.dumps({"instruction": "is the sun warm", "response": "the sun is warm"}) + "\n")
    cfg = load_config(Config, None, [f"student.path={folder}", f"eval.data={data}", "eval.answers=false"])
    s = ev.run_eval(cfg, str(tmp_path / "out"), progress=False)["models"]["student"]
    hf_tok = _hf_tok(folder)
    turns = _turn_nlls(tm, hf_tok, CONVERSATION) + _turn_nlls(
        tm, hf_tok, [{"role": "user", "content": "is the sun warm"}, {"role": "assistant", "content": "the sun is warm"}])
    total, count = sum(t[0] for t in turns), sum(t[1] for t in turns)
    assert s["tokens"] == count
    assert s["ref_nll"] == pytest.approx(total / count, abs=2e-5)
