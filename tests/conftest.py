"""Shared fixtures. 8 fake CPU devices for sharding tests (set before jax is imported); no
network; tiny random Llamas built in-test and saved as HF checkpoints."""

import os

# 8 CPU devices; XLA:CPU's per-op events in profiler traces (as `influence --profile` sets it), so
# the in-process profile test sees where the time goes
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_enable_xprof_traceme=true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# identical programs compiled again (every stage of a run builds its own jitted functions)
# come from JAX's persistent cache; results do not depend on it
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"montessori-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today"]


def make_tiny_tokenizer(folder, vocab_size: int = 300):
    """A byte-level BPE tokenizer that adds bos <s>, has eos </s> and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(SENTENCES, trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def tiny_hf_config(**kw):
    """A transformers LlamaConfig small enough for CPU tests."""
    from transformers import LlamaConfig

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_torch_llama(seed: int = 0, **kw):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**kw)).eval()
    # transformers initialises norms to 1; randomise them so the parity tests see them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An HF folder: a random tiny Llama (untied, GQA) and a tiny tokenizer without a template."""
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    tok = make_tiny_tokenizer(folder)
    model = tiny_torch_llama(vocab_size=len(tok) + 20)
    model.save_pretrained(folder)
    return str(folder), model


@pytest.fixture(scope="session")
def smollm2_path():
    from montessori_jax.core.text import embedded_smollm2_path

    return embedded_smollm2_path()


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_path):
    """transformers' own float32 Llama built from the embedded GGUF (~20 s, once a session)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_jax(smollm2_path):
    from montessori_jax.core import weights

    return weights.load_model(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tok():
    from montessori_jax.core import text

    return text.load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def served_smollm2(smollm2_path):
    """`montessori serve --model smollm2 --served-model-name judge` in a subprocess on a free loopback
    port, once a session; yields its OpenAI base URL (`.../v1`) and stops it at the end. The
    embedded model and the server's packages come with the README's test command: a missing one
    is an error, not a skip."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "montessori_jax.cli", "serve", "--model", "smollm2", "--port",
                             str(port), "--served-model-name", "judge", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "montessori serve did not start in 180 s"
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
