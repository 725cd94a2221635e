"""`montessori serve`: the OpenAI-compatible server on a tiny random Llama, driven by the
official `openai` client on loopback."""

import concurrent.futures
import json
import socket
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    from montessori_jax.stages import serve

    path, _ = tiny_checkpoint
    engine = serve.load_engine(path, name="tiny", batch_window_ms=20, max_batch=64)
    port = _free_port()
    srv = serve.make_server(engine, "127.0.0.1", port)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
    yield {"client": client, "engine": engine, "url": f"http://127.0.0.1:{port}", "path": path}
    srv.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


def _chat(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_models_list(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_and_completion_greedy(server):
    c = server["client"]
    r = _chat(c, "the cat sat", temperature=0, max_tokens=6)
    assert r.object == "chat.completion" and len(r.choices) == 1
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = _chat(c, "the cat sat", temperature=0, max_tokens=6)
    assert again.choices[0].message.content == ch.message.content

    p = c.completions.create(model="tiny", prompt=["the dog", "a sun"], temperature=0, max_tokens=5)
    assert [x.index for x in p.choices] == [0, 1]
    assert all(x.finish_reason in ("stop", "length") for x in p.choices)
    assert p.usage.completion_tokens <= 10


def test_n_and_seed_reproducible(server):
    c = server["client"]
    a = _chat(c, "a dog ran", temperature=1.0, top_p=0.95, n=2, seed=7, max_tokens=8)
    b = _chat(c, "a dog ran", temperature=1.0, top_p=0.95, n=2, seed=7, max_tokens=8)
    assert len(a.choices) == 2 and [x.index for x in a.choices] == [0, 1]
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    # the two samples of one request draw from different streams
    assert a.choices[0].message.content != a.choices[1].message.content


def test_stop_string_cuts(server):
    c = server["client"]
    full = c.completions.create(model="tiny", prompt="the cat", temperature=0, max_tokens=12).choices[0]
    text = full.text
    assert len(text) >= 4, text
    stop = text[2:4]
    first = text.find(stop)
    cut = c.completions.create(model="tiny", prompt="the cat", temperature=0, max_tokens=12, stop=[stop]).choices[0]
    assert cut.text == text[:first]
    assert cut.finish_reason == "stop"


def test_logprobs_match_the_model(server, tiny_checkpoint):
    import torch

    from montessori_jax.core import text

    c = server["client"]
    r = _chat(c, "the sun", temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == pytest.approx(tops[0], abs=1e-6)  # greedy draws the most likely token

    # the first token's log-prob from transformers' Llama on the same prompt
    tok = text.load_tokenizer(tiny_checkpoint[0])
    ids = text.encode_prompt(tok, "the sun")
    with torch.no_grad():
        logits = tiny_checkpoint[1](torch.tensor([ids])).logits[0, -1].double()
    want = torch.log_softmax(logits, -1)
    first_id = int(torch.argmax(want))
    assert content[0].logprob == pytest.approx(float(want[first_id]), abs=1e-4)

    p = c.completions.create(model="tiny", prompt="a dog", temperature=0, max_tokens=3, logprobs=2)
    lp = p.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == p.usage.completion_tokens
    assert all(len(d) <= 2 for d in lp.top_logprobs)


def test_streaming_equals_plain(server):
    c = server["client"]
    plain = _chat(c, "the mat", temperature=0, max_tokens=8).choices[0]
    stream = _chat(c, "the mat", temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == plain.message.content
    assert finish == plain.finish_reason and usage is not None

    import httpx

    with httpx.stream("POST", server["url"] + "/v1/completions",
                      json={"prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_bad_requests_get_400(server):
    import httpx

    c = server["client"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _chat(c, "hi", temperature=5)
    with pytest.raises(openai.BadRequestError, match="n"):
        _chat(c, "hi", n=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        _chat(c, "the cat sat on the mat " * 200, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _chat(c, "hi", max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "message" in r.json()["error"]
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # still serving
    assert _chat(c, "hi", temperature=0, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_load_64_concurrent_greedy_equals_generate(server, tmp_path):
    from montessori_jax.kernels import sampler as sampling
    from montessori_jax.stages.generate import generate_jsonl

    c, engine = server["client"], server["engine"]
    words = ["cat", "dog", "sun", "mat", "park", "warm", "ran", "sat"]
    prompts = [f"the {words[i % 8]} {words[(i // 8) % 8]} {'on ' * (i % 3)}today" for i in range(64)]
    calls0 = engine.calls

    def ask(p):
        r = _chat(c, p, temperature=0, max_tokens=8)
        return r.choices[0].message.content

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(ask, p) for p in prompts]
        answers = [f.result(timeout=300) for f in futures]
    assert time.perf_counter() - t0 < 300
    assert len(answers) == 64 and all(isinstance(a, str) for a in answers)
    assert engine.calls - calls0 < 64  # batched, not one call per request

    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "gen.jsonl"
    generate_jsonl(server["path"], str(out), sampling.SamplingParams(temperature=0, max_new_tokens=8),
                            input_path=str(inp), batch_size=16, progress=False)
    want = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert answers == [want[i] for i in range(64)]


def test_sampler_logprobs_off_by_default(tiny_checkpoint):
    """The default path computes no log-probs and keeps its program keys."""
    from montessori_jax.core import text, weights
    from montessori_jax.kernels.sampler import Sampler, SamplingParams

    path, _ = tiny_checkpoint
    tok = text.load_tokenizer(path)
    s = Sampler(weights.load_model(path), pad_id=tok.pad_token_id)
    ids = [text.encode_text(tok, "the cat").tolist()]
    plain = s.run_batch(ids, SamplingParams(temperature=0, max_new_tokens=4))
    assert plain.logprobs is None and all(len(k) == 4 or len(k) == 5 for k in s.programs)
    with_lp = s.run_batch(ids, SamplingParams(temperature=0, max_new_tokens=4), logprobs=2)
    np.testing.assert_array_equal(with_lp.tokens, plain.tokens)
    assert with_lp.top_logprobs.shape == (1, plain.tokens.shape[1], 2)
    assert s.num_compiled == 4


def test_synthesis_with_openai_backend_resumes(server, tmp_path):
    """`generation.backend: openai` against `montessori serve`: records with the effective
    settings; a rerun asks for nothing more; the same seed gives the same records."""
    from montessori_jax.config import BackendConfig, Config, GenerationConfig, SynthesisConfig
    from montessori_jax.stages.synthesis import run_synthesize

    gen = GenerationConfig(temperature=1.0, top_p=0.9, presence_penalty=0.5, max_new_tokens=6)
    scfg = SynthesisConfig(num_instructions=None, max_prompts=2, prompts_per_round=1, samples_per_prompt=2,
                           shots=1, generated_shots=0, preamble="Write one new task.", instruction_prefix="Task:",
                           instruction_sampling=gen, response_sampling=gen, min_chars=1, rouge_threshold=1.0)
    cfg = Config(synthesis=scfg, seed=5, generation=BackendConfig(
        backend="openai", base_url=server["url"] + "/v1", api_key_env=None, max_concurrency=4))
    out = str(tmp_path / "synth")
    calls0 = server["engine"].calls
    summary = run_synthesize(cfg, out, progress=False)
    assert summary["samples"] == 4 and summary["prompts"] == 2
    assert summary["teacher"] == f"openai:tiny@{server['url']}/v1"
    records = [json.loads(x) for x in open(f"{out}/records.jsonl")]
    dropped = [json.loads(x) for x in open(f"{out}/dropped.jsonl")]
    assert len(records) + len(dropped) == 4
    for r in records + dropped:
        assert r["raw_output"].startswith("Task:")  # the forced prefix, continued by the server
    for r in records:
        s = r["instruction_sampling"]
        assert (s["backend"], s["model"], s["n"], s["temperature"], s["top_p"], s["presence_penalty"],
                s["max_new_tokens"]) == ("openai", "tiny", 2, 1.0, 0.9, 0.5, 6)
    calls1 = server["engine"].calls
    assert calls1 > calls0
    again = run_synthesize(cfg, out, progress=False)  # resumed: finished, nothing sampled
    assert server["engine"].calls == calls1 and again["kept"] == summary["kept"]
    other = str(tmp_path / "synth2")
    run_synthesize(cfg, other, progress=False)
    assert open(f"{other}/records.jsonl").read() == open(f"{out}/records.jsonl").read()
    assert open(f"{other}/dropped.jsonl").read() == open(f"{out}/dropped.jsonl").read()
