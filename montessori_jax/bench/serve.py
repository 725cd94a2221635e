"""``montessori bench serve``: tokens/s of ``montessori serve`` under concurrent chat requests
against the sampler called directly (what ``montessori generate --batch-size N`` runs), same
model, prompts and greedy settings, side by side in one process.

The server runs in a thread on loopback; N threads of the official ``openai`` client send one
request each. Both paths are timed after a warm-up pass, so compiles are excluded.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time

from montessori_jax.bench.common import machine_info
from montessori_jax.core import text, weights
from montessori_jax.kernels import sampler as sampler_lib
from montessori_jax.stages import serve

_WORDS = ["cat", "dog", "sun", "mat", "park", "warm", "ran", "sat"]


def _prompts(n: int) -> list[str]:
    return [f"Write one sentence about the {_WORDS[i % 8]} and the {_WORDS[(i // 8) % 8]}." for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(model: str = "smollm2", requests: int = 64, max_new_tokens: int = 32,
                batch_window_ms: float = 15.0) -> dict:
    import openai

    prompts = _prompts(requests)
    tok = text.load_tokenizer(model)
    llama = weights.load_model(model)
    sampler = sampler_lib.Sampler(llama, pad_id=text.pad_id(tok))
    ids = [text.encode_prompt(tok, p) for p in prompts]
    params = sampler_lib.SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    stops = text.stop_token_ids(tok)
    sampler.generate(ids, params, stops, batch_size=requests)  # compile
    t0 = time.perf_counter()
    direct = sampler.generate(ids, params, stops, batch_size=requests)
    generate_s = time.perf_counter() - t0
    generate_tokens = sum(len(s[0].tokens) for s in direct)

    name = os.path.basename(model.rstrip("/")) or model
    engine = serve.Engine(llama, tok, name=name, batch_window_ms=batch_window_ms, max_batch=requests)
    port = _free_port()
    server = serve.make_server(engine, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600, max_retries=0)

        def ask(prompt: str) -> tuple[str, int]:
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=max_new_tokens)
            return r.choices[0].message.content, r.usage.completion_tokens

        def load() -> list[tuple[str, int]]:
            with concurrent.futures.ThreadPoolExecutor(requests) as pool:
                return list(pool.map(ask, prompts))

        load()  # compile the batch shapes the window produces
        calls0 = engine.calls
        t0 = time.perf_counter()
        served = load()
        serve_s = time.perf_counter() - t0
        calls = engine.calls - calls0
    finally:
        server.should_exit = True
        thread.join(30)
    serve_tokens = sum(n for _, n in served)
    want = [tok.decode(s[0].tokens[:-1] if s[0].finish_reason == "stop" else s[0].tokens, skip_special_tokens=True)
            for s in direct]
    return {
        "model": model, "requests": requests, "max_new_tokens": max_new_tokens,
        "batch_window_ms": batch_window_ms,
        "generate_s": round(generate_s, 2), "generate_tokens": generate_tokens,
        "generate_tokens_per_s": round(generate_tokens / generate_s, 1),
        "serve_s": round(serve_s, 2), "serve_tokens": serve_tokens,
        "serve_tokens_per_s": round(serve_tokens / serve_s, 1),
        "sampler_calls": calls, "greedy_equal": sum(a == b for (a, _), b in zip(served, want)),
        "loadavg": list(os.getloadavg()), "machine": machine_info(),
    }


def format_table(r: dict) -> str:
    lines = [
        f"bench serve: {r['model']}, {r['requests']} prompts, greedy, {r['max_new_tokens']} new tokens",
        f"{'':28} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'sampler calls':>14}",
        f"{'sampler (generate)':28} {r['generate_s']:8.2f} {r['generate_tokens']:7d} "
        f"{r['generate_tokens_per_s']:9.1f} {1:14d}",
        f"{'serve, concurrent requests':28} {r['serve_s']:8.2f} {r['serve_tokens']:7d} "
        f"{r['serve_tokens_per_s']:9.1f} {r['sampler_calls']:14d}",
        f"greedy answers equal: {r['greedy_equal']} of {r['requests']}",
    ]
    return "\n".join(lines)
