import concurrent.futures, json, os, socket, sys, threading, time
import openai
from montessori_jax import serve, sampling, text, weights
words = ["cat", "dog", "sun", "mat", "park", "warm", "ran", "sat"]
prompts = [f"Write one sentence about the {words[i % 8]} and the {words[(i // 8) % 8]}." for i in range(64)]
N = 32
tok = text.load_tokenizer("smollm2"); model = weights.load_model("smollm2")
# montessori generate path (same sampler), batch 64, warm-up run first for compile
samp = sampling.Sampler(model, pad_id=tok.pad_token_id)
ids = [text.encode_prompt(tok, p) for p in prompts]
sp = sampling.SamplingParams(temperature=0, max_new_tokens=N)
samp.generate(ids, sp, text.stop_token_ids(tok), batch_size=64)
t0 = time.perf_counter(); out = samp.generate(ids, sp, text.stop_token_ids(tok), batch_size=64); tg = time.perf_counter() - t0
gen_tokens = sum(len(s[0].tokens) for s in out)
engine = serve.Engine(model, tok, name="smollm2", batch_window_ms=15, max_batch=64)
with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
srv = serve.make_server(engine, "127.0.0.1", port); th = threading.Thread(target=srv.run, daemon=True); th.start()
while not srv.started: time.sleep(0.05)
c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600, max_retries=0)
def ask(p):
    r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}], temperature=0, max_tokens=N)
    return r.choices[0].message.content, r.usage.completion_tokens
def load():
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        return list(pool.map(ask, prompts))
load()  # compile the batch shapes the window produces
calls0 = engine.calls
t0 = time.perf_counter(); res = load(); ts = time.perf_counter() - t0
srv_tokens = sum(n for _, n in res)
want = [tok.decode(s[0].tokens[:-1] if s[0].finish_reason == "stop" else s[0].tokens, skip_special_tokens=True) for s in out]
print(json.dumps({"generate_s": round(tg, 2), "generate_tokens": gen_tokens, "generate_tok_s": round(gen_tokens / tg, 1),
                  "serve_s": round(ts, 2), "serve_tokens": srv_tokens, "serve_tok_s": round(srv_tokens / ts, 1),
                  "sampler_calls": engine.calls - calls0, "greedy_equal": sum(a == b for (a, _), b in zip(res, want)),
                  "loadavg": os.getloadavg()}))
srv.should_exit = True; th.join(30)
