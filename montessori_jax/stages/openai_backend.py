"""``generation.backend: openai``: synthesis and eval answers from an OpenAI-compatible server
(vLLM, SGLang, ``montessori serve``) instead of the in-process sampler.

Each prompt is one ``/v1/chat/completions`` request carrying the same settings the jax
backend uses: ``n`` samples, temperature, top_p, top_k (vLLM's extension, sent only when on),
presence_penalty, max_tokens, and a seed derived from (the phase's seed, the prompt's row id),
so a rerun asks for the same samples. No ``best_of`` (current vLLM removed it). A forced
assistant prefix is sent as a last assistant message with ``continue_final_message`` (vLLM's
extension). Requests run ``max_concurrency`` at a time over plain httpx.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from montessori_jax.config import BackendConfig, GenerationConfig
from montessori_jax.errors import UserError
from montessori_jax.files import open_append


def request_seed(seed: int, row_id: int) -> int:
    """The seed sent for one prompt: a function of the phase seed and the prompt's row id."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(row_id) % 2**63]).generate_state(1)[0] & 0x7FFFFFFF)


class OpenAIClient:
    """Chat completions against ``cfg.base_url``; errors become one-line ``UserError``s."""

    def __init__(self, cfg: BackendConfig):
        import httpx

        if not cfg.base_url:
            raise UserError("generation.base_url: the openai backend needs the server's URL (e.g. http://host:8000/v1)")
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(timeout=cfg.timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=cfg.max_concurrency))
        self._model = cfg.model

    @property
    def model(self) -> str:
        """``generation.model``, or the server's only model."""
        if self._model is None:
            data = self._request("GET", "/models").get("data") or []
            if len(data) != 1:
                raise UserError(f"{self.base_url}/models lists {len(data)} models; set generation.model")
            self._model = data[0]["id"]
        return self._model

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        url = self.base_url + path
        for attempt in range(3):
            try:
                r = self.http.request(method, url, json=body)
            except httpx.HTTPError as e:
                if attempt == 2:
                    raise UserError(f"{url}: cannot reach the server ({type(e).__name__}: {e})") from None
                time.sleep(1.0 * (attempt + 1))
                continue
            if r.status_code >= 500 and attempt < 2:
                time.sleep(1.0 * (attempt + 1))
                continue
            if r.status_code != 200:
                try:
                    err = r.json().get("error") or r.json()
                    msg = err.get("message") if isinstance(err, dict) else str(err)
                except (ValueError, AttributeError):
                    msg = r.text[:200]
                raise UserError(f"{url}: HTTP {r.status_code}: {msg}")
            return r.json()
        raise AssertionError("unreachable")

    def chat(self, messages: list[dict], params: GenerationConfig, *, n: int, seed: int,
             continue_final: bool = False) -> list[tuple[str, str, int]]:
        """``n`` (text, finish_reason, completion tokens or 0 when n > 1) for one conversation."""
        body = request_body(self.model, messages, params, n=n, seed=seed, continue_final=continue_final)
        out = self._request("POST", "/chat/completions", body)
        choices = sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise UserError(f"{self.base_url}/chat/completions returned {len(choices)} choices, expected n={n}")
        tokens = (out.get("usage") or {}).get("completion_tokens", 0) if n == 1 else 0
        return [((c.get("message") or {}).get("content") or "", c.get("finish_reason") or "stop", tokens)
                for c in choices]

    def map(self, fn, items: Sequence):
        """``fn`` over ``items``, ``max_concurrency`` at a time, results in order."""
        with concurrent.futures.ThreadPoolExecutor(self.cfg.max_concurrency) as pool:
            return list(pool.map(fn, items))


def request_body(model: str, messages: list[dict], params: GenerationConfig, *, n: int, seed: int,
                 continue_final: bool = False) -> dict:
    """The request for one prompt: the effective sampling settings, as recorded."""
    body = {"model": model, "messages": messages, "n": n, "temperature": params.temperature,
            "top_p": params.top_p, "presence_penalty": params.presence_penalty,
            "max_tokens": params.max_new_tokens, "seed": seed}
    if params.top_k:
        body["top_k"] = params.top_k
    if continue_final:
        body.update(add_generation_prompt=False, continue_final_message=True)
    return body


def describe(cfg: BackendConfig, model: str) -> dict:
    """What the records say about where their samples came from."""
    return {"backend": "openai", "base_url": cfg.base_url, "model": model,
            "seed": "per prompt: request_seed(phase seed, row id)"}


def answer_jsonl(cfg: BackendConfig, out_path: str, rows: list[dict], params: GenerationConfig, *, seed: int,
                 system: str | None = None, done: set | None = None) -> dict:
    """Eval answers through the server: one row per prompt row not yet in ``out_path`` (the
    rows of ``montessori generate``: id, sample 0, text, num_tokens, finish_reason), appended
    as they finish in order of the input, so a rerun continues. ``rows``: ``read_prompt_rows``."""
    client = OpenAIClient(cfg)
    done = done or set()
    todo = [r for r in rows if (json.dumps(r["id"]), 0) not in done]
    t0, written, tokens = time.perf_counter(), 0, 0

    def one(r):
        content = r["content"]
        msgs = [{"role": "user", "content": content}] if isinstance(content, str) else list(content)
        if system is not None:
            msgs = [{"role": "system", "content": system}] + msgs
        return client.chat(msgs, params, n=1, seed=request_seed(seed, r["index"]))[0]

    step = max(1, cfg.max_concurrency)
    with open_append(out_path) as f:  # in the writer of a cluster only
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            for r, (text, finish, n_tok) in zip(chunk, client.map(one, chunk)):
                f.write(json.dumps({"id": r["id"], "sample": 0, "text": text, "num_tokens": n_tok,
                                    "finish_reason": finish}, ensure_ascii=False) + "\n")
                written, tokens = written + 1, tokens + n_tok
            f.flush()
    return {"written": written, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 3),
            **describe(cfg, client.model)}
