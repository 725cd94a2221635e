"""``montessori serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on our sampler.

Endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``.

    request ─► validate (400 on a bad field or a prompt past the context) ─► encode ─► Job
    Jobs ─► queue ─► one worker thread: collect for ``batch_window_ms`` (or ``max_batch`` rows)
      ─► group by the settings one sampler call shares ─► Sampler.run_batch per group
      ─► per job: cut at its own max_tokens and stop strings, detokenize ─► the response

One model is loaded once; the worker is the only caller of the sampler. A group shares
(temperature, top_p, top_k, presence_penalty, seed, n, logprobs on/off); a greedy group
ignores seed, top_p and top_k. Each row decodes to the group's largest ``max_tokens`` and is
cut to its own: a row's tokens do not depend on the batch (sampling keys are per row), so the
cut is exact. Random streams: a request with ``seed`` keys its samples by (seed, prompt
tokens, sample index), so the same request gives the same answer in any batch; one without
gets a fresh random stream.

Streaming (``stream: true``) sends server-sent events once the request's batch is done, one
chunk per generated token (with its log-probs when asked), then ``data: [DONE]``: the events
follow the OpenAI format, but the first arrives only when the whole answer is ready.
"""


import asyncio
import dataclasses
import json
import logging
import queue
import secrets
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from montessori_jax.core import text, weights
from montessori_jax.errors import UserError
from montessori_jax.kernels.sampler import Sampler, SamplingParams

log = logging.getLogger("montessori_jax.stages.serve")

MAX_TOP_LOGPROBS = 20  # the OpenAI limit; one program size serves every request with logprobs
DEFAULT_MAX_TOKENS = 256  # when a request gives none (capped by the context left)


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


# ---------------------------------------------------------------------------------------------
# The batching engine (no HTTP here)


@dataclasses.dataclass
class Job:
    """One request's work: prompts (token ids), ``n`` samples each, its own limits."""

    prompts: list[list[int]]
    n: int
    temperature: float
    top_p: float
    top_k: int
    presence_penalty: float
    max_tokens: int
    seed: int
    row_ids: list[int]
    logprobs: bool
    done: Any = None  # callback(result or exception), called from the worker thread

    def group_key(self) -> tuple:
        if self.temperature == 0:
            return ("greedy", self.presence_penalty, self.n, self.logprobs)
        return ("sample", self.temperature, self.top_p, self.top_k, self.presence_penalty, self.seed, self.n,
                self.logprobs)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclasses.dataclass
class RowResult:
    """One sample: its token ids (the stop id last when it stopped), why it ended, log-probs."""

    tokens: list[int]
    finish_reason: str
    logprobs: np.ndarray | None = None  # [T] the drawn tokens'
    top_logprobs: np.ndarray | None = None  # [T, K]
    top_ids: np.ndarray | None = None  # [T, K]


class Engine:
    """The model, its tokenizer and sampler, and the worker that batches jobs.

    batch_window_ms: how long the worker waits for more jobs after the first one arrives.
    max_batch: rows (prompts x samples) per sampler call; a single prompt's n may exceed it.
    """

    def __init__(self, model, tokenizer, *, name: str, batch_window_ms: float = 15.0, max_batch: int = 64,
                 seed: int | None = None):

        if max_batch < 1:
            raise UserError(f"max_batch={max_batch}: expected an integer >= 1")
        if batch_window_ms < 0:
            raise UserError(f"batch_window_ms={batch_window_ms}: expected a number >= 0")
        self.tokenizer = tokenizer
        self.name = name
        self.sampler = Sampler(model, pad_id=text.pad_id(tokenizer))
        self.context = model.cfg.max_position_embeddings
        self.vocab_size = model.cfg.vocab_size
        self.stop_ids = text.stop_token_ids(tokenizer)
        self.batch_window = batch_window_ms / 1000.0
        self.max_batch = max_batch
        self.seed = secrets.randbits(31) if seed is None else int(seed)
        self.calls = 0  # sampler calls made (tests and logs read it)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="montessori-serve-batcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop taking jobs; the jobs already queued fail with 503; the worker ends."""
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        if self._closed:
            raise RequestError("the server is shutting down", status=503, kind="server_error")
        self._queue.put(job)

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            jobs, rows = [first], first.rows
            deadline = time.monotonic() + self.batch_window
            stop = False
            while rows < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                rows += job.rows
            self._run(jobs)
            if stop:
                break
        while True:  # fail whatever is still queued
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.done(RequestError("the server is shutting down", status=503, kind="server_error"))

    def _run(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.group_key(), []).append(job)
        for group in groups.values():
            # split into calls of at most max_batch rows whose longest prompt + longest limit fit
            calls, current = [], []
            for job in group:
                for i in range(len(job.prompts)):
                    item = (job, i)
                    trial = current + [item]
                    fits = (max(len(j.prompts[k]) for j, k in trial) + max(j.max_tokens for j, _ in trial)
                            <= self.context)
                    if current and (len(trial) * job.n > self.max_batch or not fits):
                        calls.append(current)
                        trial = [item]
                    current = trial
            if current:
                calls.append(current)
            results: dict[int, dict[int, list[RowResult]]] = {id(j): {} for j in group}
            failed: dict[int, BaseException] = {}
            for call in calls:
                try:
                    out = self._call(call)
                except Exception as e:  # a bug or a device error: answer 500, keep serving
                    log.exception("sampler call failed")
                    for job, _ in call:
                        failed[id(job)] = e
                    continue
                for (job, i), samples in zip(call, out):
                    results[id(job)][i] = samples
            for job in group:
                if id(job) in failed:
                    job.done(failed[id(job)])
                else:
                    job.done([results[id(job)][i] for i in range(len(job.prompts))])

    def _call(self, call: list[tuple[Job, int]]) -> list[list[RowResult]]:
        job0 = call[0][0]
        greedy = job0.temperature == 0
        params = SamplingParams(
            temperature=job0.temperature, top_p=1.0 if greedy else job0.top_p, top_k=0 if greedy else job0.top_k,
            presence_penalty=job0.presence_penalty, max_new_tokens=max(j.max_tokens for j, _ in call),
            n=job0.n, seed=0 if greedy else job0.seed,
        )
        prompts = [job.prompts[i] for job, i in call]
        row_ids = [job.row_ids[i] for job, i in call]
        out = self.sampler.run_batch(prompts, params, self.stop_ids, row_ids=row_ids,
                                     logprobs=MAX_TOP_LOGPROBS if job0.logprobs else 0)
        self.calls += 1
        results = []
        for b, (job, _) in enumerate(call):
            samples = []
            for j in range(job.n):
                r = b * job.n + j
                k = int(out.num_tokens[r])
                stopped = bool(out.stopped[r])
                if k > job.max_tokens:  # decoded past this job's own limit: cut
                    k, stopped = job.max_tokens, False
                samples.append(RowResult(
                    out.tokens[r, :k].tolist(), "stop" if stopped else "length",
                    *((out.logprobs[r, :k], out.top_logprobs[r, :k], out.top_ids[r, :k]) if job.logprobs else ()),
                ))
            results.append(samples)
        return results


# ---------------------------------------------------------------------------------------------
# Requests: schemas, validation, encoding


def _schemas():
    """The pydantic request models (built on first use, so importing this module stays light)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        n: int = Field(1, ge=1, le=128)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=-1)  # vLLM's extension; -1 and 0 are off
        presence_penalty: float = Field(0.0, ge=-2, le=2)
        frequency_penalty: float = 0.0
        max_tokens: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict | None = None
        best_of: int | None = None
        user: str | None = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[dict]

    class Chat(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
        add_generation_prompt: bool = True  # vLLM's extensions: with continue_final_message, the
        continue_final_message: bool = False  # last (assistant) message is continued, not closed

    class Completion(Sampling):
        prompt: str | list[str] | list[int] | list[list[int]]
        logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
        echo: bool = False
        suffix: str | None = None

    return Chat, Completion


def _common_checks(req) -> None:
    if req.frequency_penalty != 0:
        raise RequestError("frequency_penalty is not supported (use presence_penalty)", "frequency_penalty")
    if req.best_of not in (None, 1):
        raise RequestError("best_of is not supported", "best_of")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise RequestError("stop: at most 4 non-empty strings", "stop")


def _stops(req) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError("only text content parts are supported", "messages")
        parts.append(part["text"])
    return "".join(parts)


def encode_chat(tok, req) -> list[int]:
    """The prompt ids of a chat request under the model's chat template."""

    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m.content)}
            for m in req.messages]
    if req.continue_final_message:
        if req.add_generation_prompt:
            raise RequestError("continue_final_message needs add_generation_prompt false", "continue_final_message")
        if msgs[-1]["role"] != "assistant":
            raise RequestError("continue_final_message needs an assistant message last", "messages")
        # the assistant turn opened by the template, then the given text (as the jax backend does)
        head = text.encode_prompt(tok, msgs[:-1]) if len(msgs) > 1 else None
        if head is None:
            raise RequestError("continue_final_message needs a message before the assistant's", "messages")
        tail = msgs[-1]["content"]
        return head + (list(tok(tail, add_special_tokens=False)["input_ids"]) if tail else [])
    if not req.add_generation_prompt:
        raise RequestError("add_generation_prompt false is only supported with continue_final_message",
                           "add_generation_prompt")
    try:
        return text.encode_prompt(tok, msgs)
    except UserError as e:
        raise RequestError(str(e), "messages") from None


def encode_completion_prompts(tok, prompt, vocab_size: int) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = list(tok(p, add_special_tokens=True)["input_ids"]) if isinstance(p, str) else list(p)
        if not ids:
            raise RequestError("a prompt has no tokens", "prompt")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise RequestError(f"a prompt token id is outside the vocabulary of {vocab_size}", "prompt")
        out.append(ids)
    return out


def _row_id(ids: Sequence[int]) -> int:
    return zlib.crc32(np.asarray(ids, np.int64).tobytes()) & 0x7FFFFFFF


def make_job(engine: Engine, req, prompts: list[list[int]], max_tokens: int | None, logprobs: bool) -> Job:
    """Check the prompts against the context and fill the job's settings (401 never; 400 here)."""
    ctx = engine.context
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise RequestError(f"this model's maximum context length is {ctx} tokens; the prompt has {longest}",
                           "messages" if hasattr(req, "messages") else "prompt")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, ctx - longest)
    elif longest + max_tokens > ctx:
        raise RequestError(
            f"this model's maximum context length is {ctx} tokens; the prompt has {longest} and max_tokens "
            f"asks for {max_tokens} more", "max_tokens")
    seeded = req.seed is not None
    return Job(
        prompts=prompts, n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
        presence_penalty=req.presence_penalty, max_tokens=max_tokens,
        seed=req.seed if seeded else engine.seed,
        row_ids=[_row_id(p) if seeded else secrets.randbits(31) for p in prompts], logprobs=logprobs,
    )


# ---------------------------------------------------------------------------------------------
# Results -> OpenAI response bodies


@dataclasses.dataclass
class Choice:
    text: str
    finish_reason: str
    tokens: list[int]  # the tokens counted (the stop id included; cut after a stop string)
    pieces: list[str]  # text added by each counted token (they join to ``text``)
    row: RowResult


def finish_choice(tok, row: RowResult, stops: Sequence[str]) -> Choice:
    """The text of one sample: the stop id dropped, special tokens skipped, cut before the
    first stop string (then finish_reason is "stop" and only the tokens up to it count)."""
    tokens = list(row.tokens)
    body = tokens[:-1] if row.finish_reason == "stop" else tokens
    finish = row.finish_reason
    prefixes = [tok.decode(body[:k], skip_special_tokens=True) for k in range(len(body) + 1)]
    full = prefixes[-1]
    if stops and any(s in full for s in stops):
        for k in range(1, len(body) + 1):
            hits = [prefixes[k].find(s) for s in stops if s in prefixes[k]]
            if hits:
                full, body, tokens, finish = prefixes[k][: min(hits)], body[:k], body[:k], "stop"
                prefixes = prefixes[: k + 1]
                break
    cuts = [min(len(p), len(full)) if full.startswith(p[: min(len(p), len(full))]) else 0 for p in prefixes[1:]]
    cuts = list(np.maximum.accumulate(cuts)) if cuts else []
    if cuts:
        cuts[-1] = len(full)
    pieces, prev = [], 0
    for c in cuts:
        pieces.append(full[prev:c])
        prev = c
    if len(tokens) > len(body):  # the stop id: no text
        pieces.append("")
    return Choice(full, finish, tokens, pieces, row)


def _token_str(tok, i: int) -> str:
    return tok.decode([int(i)], skip_special_tokens=False)


def _chat_logprob_entries(tok, ch: Choice, k: int) -> list[dict]:
    out = []
    for t, tid in enumerate(ch.tokens):
        s = _token_str(tok, tid)
        tops = [{"token": (ts := _token_str(tok, i)), "logprob": float(lp), "bytes": list(ts.encode())}
                for i, lp in zip(ch.row.top_ids[t, :k], ch.row.top_logprobs[t, :k])]
        out.append({"token": s, "logprob": float(ch.row.logprobs[t]), "bytes": list(s.encode()), "top_logprobs": tops})
    return out


def _completion_logprobs(tok, ch: Choice, k: int, start: int = 0) -> dict:
    tokens = [_token_str(tok, tid) for tid in ch.tokens]
    offsets, pos = [], start
    for piece in ch.pieces:
        offsets.append(pos)
        pos += len(piece)
    tops = []
    for t in range(len(ch.tokens)):
        d: dict[str, float] = {}
        for i, lp in zip(ch.row.top_ids[t, :k], ch.row.top_logprobs[t, :k]):
            d.setdefault(_token_str(tok, i), float(lp))
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": [float(x) for x in ch.row.logprobs[: len(ch.tokens)]],
            "top_logprobs": tops, "text_offset": offsets}


def _usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(len(ch.tokens) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ---------------------------------------------------------------------------------------------
# The app


def create_app(engine: Engine):
    """The FastAPI app over a started-on-startup ``engine``."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    Chat, CompletionReq = _schemas()
    tok = engine.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="montessori serve", lifespan=lifespan)

    def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        return error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}",
                     "invalid_request_error", where or None)

    def check_model(req) -> None:
        if req.model and req.model != engine.name:
            raise RequestError(f"the model `{req.model}` does not exist; this server has `{engine.name}`",
                               "model", status=404, kind="not_found_error")

    async def run(job: Job) -> list[list[RowResult]]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def resolve(value):
            if not fut.done():
                (fut.set_exception if isinstance(value, BaseException) else fut.set_result)(value)

        job.done = lambda value: loop.call_soon_threadsafe(resolve, value)
        engine.submit(job)
        try:
            return await fut
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(f"generation failed: {type(e).__name__}: {e}", status=500, kind="server_error") from e

    def sse(chunks):
        def gen():
            for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "montessori-jax", "max_model_len": engine.context}]}

    @app.post("/v1/chat/completions")
    async def chat(req: Chat):
        check_model(req)
        _common_checks(req)
        k = (req.top_logprobs or 0) if req.logprobs else 0
        if req.top_logprobs and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs true", "top_logprobs")
        prompt = encode_chat(tok, req)
        job = make_job(engine, req, [prompt], req.max_completion_tokens or req.max_tokens, req.logprobs)
        (samples,) = await run(job)
        stops = _stops(req)
        choices = [finish_choice(tok, s, stops) for s in samples]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = _usage([prompt], choices)
        if not req.stream:
            body = {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                    "choices": [{"index": j, "message": {"role": "assistant", "content": ch.text},
                                 "logprobs": {"content": _chat_logprob_entries(tok, ch, k)} if req.logprobs else None,
                                 "finish_reason": ch.finish_reason} for j, ch in enumerate(choices)],
                    "usage": usage}
            return JSONResponse(body)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name}
        chunks = []
        for j, ch in enumerate(choices):
            chunks.append({**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            entries = _chat_logprob_entries(tok, ch, k) if req.logprobs else None
            for t, piece in enumerate(ch.pieces):
                last = t == len(ch.pieces) - 1
                chunks.append({**base, "choices": [{
                    "index": j, "delta": {"content": piece},
                    "logprobs": {"content": [entries[t]]} if entries else None,
                    "finish_reason": ch.finish_reason if last else None}]})
            if not ch.pieces:
                chunks.append({**base, "choices": [{"index": j, "delta": {}, "logprobs": None,
                                                    "finish_reason": ch.finish_reason}]})
        if (req.stream_options or {}).get("include_usage"):
            chunks.append({**base, "choices": [], "usage": usage})
        return sse(chunks)

    @app.post("/v1/completions")
    async def completions(req: CompletionReq):
        check_model(req)
        _common_checks(req)
        if req.echo:
            raise RequestError("echo is not supported", "echo")
        if req.suffix:
            raise RequestError("suffix is not supported", "suffix")
        prompts = encode_completion_prompts(tok, req.prompt, engine.vocab_size)
        wants_lp = req.logprobs is not None
        job = make_job(engine, req, prompts, req.max_tokens if req.max_tokens is not None else 16, wants_lp)
        results = await run(job)
        stops = _stops(req)
        choices = [finish_choice(tok, s, stops) for samples in results for s in samples]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage = _usage(prompts, choices)
        k = req.logprobs or 0
        if not req.stream:
            body = {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                    "choices": [{"index": i, "text": ch.text,
                                 "logprobs": _completion_logprobs(tok, ch, k) if wants_lp else None,
                                 "finish_reason": ch.finish_reason} for i, ch in enumerate(choices)],
                    "usage": usage}
            return JSONResponse(body)
        base = {"id": rid, "object": "text_completion", "created": created, "model": engine.name}
        chunks = []
        for i, ch in enumerate(choices):
            lp = _completion_logprobs(tok, ch, k) if wants_lp else None
            offset = 0
            for t, piece in enumerate(ch.pieces):
                last = t == len(ch.pieces) - 1
                one = None
                if lp:
                    one = {"tokens": [lp["tokens"][t]], "token_logprobs": [lp["token_logprobs"][t]],
                           "top_logprobs": [lp["top_logprobs"][t]], "text_offset": [offset]}
                chunks.append({**base, "choices": [{"index": i, "text": piece, "logprobs": one,
                                                    "finish_reason": ch.finish_reason if last else None}]})
                offset += len(piece)
            if not ch.pieces:
                chunks.append({**base, "choices": [{"index": i, "text": "", "logprobs": None,
                                                    "finish_reason": ch.finish_reason}]})
        if (req.stream_options or {}).get("include_usage"):
            chunks.append({**base, "choices": [], "usage": usage})
        return sse(chunks)

    return app


def load_engine(model_path: str, *, name: str | None = None, batch_window_ms: float = 15.0, max_batch: int = 64,
                param_dtype: str = "float32", dtype: str = "float32") -> Engine:
    """Load the model and tokenizer once; ``name`` (default: the path's last part) is the id
    clients pass as ``model``."""
    import os

    tok = text.load_tokenizer(model_path)
    model = weights.load_model(model_path, param_dtype=param_dtype, dtype=dtype)
    if name is None:
        name = model_path if model_path == "smollm2" else os.path.basename(os.path.normpath(model_path))
    return Engine(model, tok, name=name, batch_window_ms=batch_window_ms, max_batch=max_batch)


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    """A ``uvicorn.Server`` for the app (``.run()`` blocks; ``.should_exit = True`` stops it
    after the requests in flight are answered)."""
    import uvicorn

    config = uvicorn.Config(create_app(engine), host=host, port=port, log_level=log_level, lifespan="on")
    return uvicorn.Server(config)
