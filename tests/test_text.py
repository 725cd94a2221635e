"""Tests for montessori_jax.text: tokenizers, templates, label masks, padding, buckets."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from conftest import make_tiny_tokenizer

from montessori_jax.core import batching, text
from montessori_jax.errors import UserError


@pytest.fixture(scope="module")
def smol(smollm2_tok):
    """The embedded SmolLM2 tokenizer (the test command installs it; absent is a failure)."""
    return smollm2_tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A byte-level BPE tokenizer that adds bos <s>, has eos </s> and no chat template."""
    folder = tmp_path_factory.mktemp("tiny_tok")
    assert make_tiny_tokenizer(folder).chat_template is None
    return text.load_tokenizer(str(folder))


def test_chatml_response_only_labels(smol):
    prompt, response = "What is the capital of France?", "The capital of France is Paris."
    ex = text.encode_example(smol, prompt, response)
    assert smol.decode(ex.tokens[ex.loss_mask]) == response + "<|im_end|>"
    # Everything up to the generation prompt is context only, and the trailing "\n" too.
    n_prompt = len(text.encode_prompt(smol, prompt))
    assert list(ex.tokens[:n_prompt]) == text.encode_prompt(smol, prompt)
    assert not ex.loss_mask[:n_prompt].any()
    assert ex.loss_mask[n_prompt]
    assert smol.decode(ex.tokens[-1:]) == "\n" and not ex.loss_mask[-1]
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool and not ex.truncated


def test_chatml_template_and_stops(smol):
    assert smol.chat_template != text.LLAMA3_DEFAULT_TEMPLATE  # its own
    assert text.stop_token_ids(smol) == [2]
    ids = text.encode_prompt(smol, "Hi", system="Be brief.")
    rendered = smol.decode(ids)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert "Be brief." in rendered and "SmolLM" not in rendered


def test_llama3_default_template_labels(tiny):
    assert tiny.chat_template == text.LLAMA3_DEFAULT_TEMPLATE  # the fallback
    assert tiny.chat_template == text.LLAMA3_DEFAULT_TEMPLATE
    prompt, response = "the dog sat", "the cat ran in the park"
    ex = text.encode_example(tiny, prompt, response)
    assert tiny.decode(ex.tokens[ex.loss_mask]) == response + "</s>"
    assert tiny.decode(ex.tokens) == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nthe dog sat</s>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nthe cat ran in the park</s>"
    )
    assert ex.tokens[0] == tiny.bos_token_id and ex.tokens[-1] == tiny.eos_token_id


def test_llama3_default_prompt_and_stops(tiny):
    assert text.stop_token_ids(tiny) == [tiny.eos_token_id]
    assert tiny.pad_token_id == tiny.eos_token_id
    ids = text.encode_prompt(tiny, [{"role": "user", "content": "the sun"}], system="be warm")
    assert tiny.decode(ids) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nbe warm</s>"
        "<|start_header_id|>user<|end_header_id|>\n\nthe sun</s>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids.count(tiny.bos_token_id) == 1  # no second bos from tokenization


def test_encode_text(tiny):
    ids = text.encode_text(tiny, "the cat sat")
    assert ids.dtype == np.int32
    assert ids[0] == tiny.bos_token_id and tiny.decode(ids) == "<s>the cat sat"


def test_truncation_keeps_start(tiny):
    full = text.encode_example(tiny, "the dog sat", "the cat ran in the park")
    cut = text.encode_example(tiny, "the dog sat", "the cat ran in the park", max_len=len(full) - 3)
    assert cut.truncated and not full.truncated
    np.testing.assert_array_equal(cut.tokens, full.tokens[: len(full) - 3])
    np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[: len(full) - 3])
    exact = text.encode_example(tiny, "the dog sat", "the cat ran in the park", max_len=len(full))
    assert not exact.truncated and len(exact) == len(full)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=str(missing)):
        text.load_tokenizer(str(missing))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(UserError, match="empty_model.*no tokenizer files"):
        text.load_tokenizer(str(empty))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match="bad.gguf"):
        text.load_tokenizer(str(bad))


def test_bucket_length():
    assert batching.bucket_length(1) == 64
    assert batching.bucket_length(64) == 64
    assert batching.bucket_length(65) == 128
    assert batching.bucket_length(8192) == 8192
    assert batching.bucket_length(8193) == 16384
    assert batching.bucket_length(10, (16, 8)) == 16


def _padded_slots(lengths, group, plan):
    order = sorted(lengths)
    return sum(group * batching.bucket_length(max(order[i:i + group]), plan) for i in range(0, len(order), group))


def test_plan_lengths_pads_least_within_its_count():
    """Against brute force over every choice of at most K lengths from the groups' (rounded)
    maxima, which must include the longest; a hand case; and the bounds of the result."""
    import itertools

    # hand case, one row a group: 10 and 12 -> 16, 30 -> 32, 40 -> 48; two lengths: {16, 48}
    # pads 16 + 16 + 48 + 48 = 128, {32, 48} 32 * 3 + 48 = 144, so {16, 48}
    assert batching.plan_lengths([40, 10, 30, 12], 1, 2) == (16, 48)
    assert batching.plan_lengths([40, 10, 30, 12], 1, 9) == (16, 32, 48)
    assert batching.plan_lengths([40, 10, 30, 12], 1, 1) == (48,)
    assert batching.plan_lengths([], 4, 3) == ()
    rng = np.random.default_rng(3)
    for trial in range(40):
        lengths = rng.integers(1, 700, rng.integers(1, 30)).tolist()
        group, k, mult = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.choice([1, 16, 128]))
        plan = batching.plan_lengths(lengths, group, k, mult)
        order = sorted(lengths)
        tops = sorted({mult * -(-max(order[i:i + group]) // mult) for i in range(0, len(order), group)})
        assert 1 <= len(plan) <= k and set(plan) <= set(tops) and plan[-1] == tops[-1]
        best = min(_padded_slots(lengths, group, c + (tops[-1],))
                   for r in range(k) for c in itertools.combinations(tops[:-1], r))
        assert _padded_slots(lengths, group, plan) == best, (lengths, group, k, mult)
    with pytest.raises(ValueError, match="max_lengths"):
        batching.plan_lengths([3], 1, 0)


def test_pad_batch_right():
    out = batching.pad_batch(
        [np.array([5, 6, 7]), np.array([8])],
        [np.array([False, True, True]), np.array([False])],
        length=4,
        pad_id=0,
        side="right",
    )
    np.testing.assert_array_equal(out["tokens"], [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 0], [0, 0, 0, 0]])
    assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == bool


def test_pad_batch_left_default_mask():
    out = batching.pad_batch([np.array([5, 6, 7]), np.array([8, 9])], None, 5, pad_id=2, side="left")
    np.testing.assert_array_equal(out["tokens"], [[2, 2, 5, 6, 7], [2, 2, 2, 8, 9]])
    np.testing.assert_array_equal(out["segment_ids"], [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(out["positions"], [[0, 0, 0, 1, 2], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])


def test_batches_bucket_and_cover():
    rng = np.random.default_rng(0)
    lengths = [3, 70, 10, 200, 65, 5, 130, 9, 64, 1]
    examples = [
        text.Example(rng.integers(3, 50, n).astype(np.int32), np.arange(n) > 0) for n in lengths
    ]
    out = list(batching.batches(examples, batch_size=4, pad_id=0, shuffle_seed=1))
    seen = sorted(i for idx, _ in out for i in idx)
    assert seen == list(range(len(examples)))
    shapes = {b["tokens"].shape for _, b in out}
    assert shapes <= {(4, 64), (4, 128), (4, 256)} and len(out) == 3
    for idx, b in out:
        T = b["tokens"].shape[1]
        assert T == batching.bucket_length(max(lengths[i] for i in idx))
        for row, i in enumerate(idx):
            np.testing.assert_array_equal(b["tokens"][row, : lengths[i]], examples[i].tokens)
            np.testing.assert_array_equal(b["loss_mask"][row, : lengths[i]], examples[i].loss_mask)
        assert not b["segment_ids"][len(idx) :].any()  # filler rows are all pad
        assert not b["loss_mask"][len(idx) :].any()
    assert sum(len(idx) for idx, _ in out) == 10  # last batch has 2 real rows + 2 filler
    # Same seed, same order; sorting groups similar lengths.
    again = [idx for idx, _ in batching.batches(examples, 4, shuffle_seed=1)]
    assert again == [idx for idx, _ in out]
    plain = [idx for idx, _ in batching.batches(examples, 4)]
    assert plain == [[9, 0, 5, 7], [2, 8, 4, 1], [6, 3]]


def test_gguf_tokenizer_without_torch_equals_transformers(smol, smollm2_path):
    """Ours reads GGUF metadata with the gguf package (the product installs no torch); it must
    give transformers' own GGUF tokenizer, token for token."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(smollm2_path)
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = ["Hello world!", "  two  spaces\nnewline 12345 café ümlaut 🙂",
             "<|im_start|>user\nHi<|im_end|>\n", "def f(x):\n    return x**2  # comment"]
    for s in texts:
        assert smol(s).input_ids == ref(s).input_ids, s
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert smol.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (smol.bos_token, smol.eos_token, len(smol)) == (ref.bos_token, ref.eos_token, len(ref))


def test_no_torch_needed_for_the_embedded_model(tmp_path):
    """The README's main command installs no torch: score must work with torch unimportable."""
    import subprocess
    import sys

    # as in a venv without torch: `import torch` fails and transformers finds no torch
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "Hi", "response": "Hello!"}\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "montessori_jax.cli", "score", "--model", "smollm2",
                           "--input", str(inp), "--out", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"tokens": ' in (tmp_path / "o.jsonl").read_text()


# --------------------------------------------------------------------------- chat template files

BRACKET_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}\n"
)


def test_chat_template_file_replaces_the_tokenizers_own(tmp_path):
    folder = tmp_path / "tok"
    make_tiny_tokenizer(folder)
    path = tmp_path / "bracket.jinja"
    path.write_text(BRACKET_TEMPLATE, encoding="utf-8")
    own = text.load_tokenizer(str(folder))
    tok = text.load_tokenizer(str(folder), str(path))
    assert tok.chat_template == BRACKET_TEMPLATE
    # encoded prompts and examples use the file's template (a file's one trailing newline is dropped)
    assert tok.decode(text.encode_prompt(tok, "  the dog sat ")) == "[user]the dog sat</s>[assistant]"
    ex = text.encode_example(tok, "the dog sat", "the cat ran")
    assert tok.decode(ex.tokens) == "[user]the dog sat</s>[assistant]the cat ran</s>"
    assert tok.decode(ex.tokens[ex.loss_mask]) == "the cat ran</s>"
    # the shared tokenizer of the folder keeps its own template; the same file gives the same object
    assert own.chat_template == text.LLAMA3_DEFAULT_TEMPLATE
    assert text.load_tokenizer(str(folder)) is own
    assert text.load_tokenizer(str(folder), str(path)) is tok
    assert tok.decode(text.encode_prompt(own, "the dog sat")).startswith("<s><|start_header_id|>user")


def test_chat_template_file_errors_name_the_key_and_path(tmp_path):
    folder = tmp_path / "tok"
    make_tiny_tokenizer(folder)
    missing = tmp_path / "nope.jinja"
    with pytest.raises(UserError, match=rf"^student\.chat_template: {missing}: no such template file$"):
        text.load_tokenizer(str(folder), str(missing), key="student.chat_template")
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    with pytest.raises(UserError, match=r"teacher\.chat_template: .*empty\.jinja: the template file is empty"):
        text.load_tokenizer(str(folder), str(empty), key="teacher.chat_template")
    latin = tmp_path / "latin.jinja"
    latin.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(UserError, match=r"chat_template: .*latin\.jinja: not UTF-8"):
        text.load_tokenizer(str(folder), str(latin))


def test_model_config_chat_template_key():
    from montessori_jax.config import Config, load_config

    cfg = load_config(Config, None, ["student.chat_template=/t/llama3.jinja"])
    assert cfg.student.chat_template == "/t/llama3.jinja" and cfg.teacher.chat_template is None
