"""An OpenAI-compatible completions server (``mamba2 serve``) on the continuous-batching engine.

Threading (docs/design.md §7): the :class:`~mamba2.serving.engine.Engine` is owned by one worker thread
(:class:`EngineWorker`), which takes new requests and aborts from a locked inbox, steps the engine, and hands each
:class:`~mamba2.serving.engine.RequestOutput` to the asyncio queue of its HTTP request with
``loop.call_soon_threadsafe``. The HTTP side (FastAPI on uvicorn, one event loop) parses and validates requests,
tokenizes, turns tokens into text (:class:`~mamba2.serving.text.TextStream`) and answers; a client that
disconnects, a stop string, a timeout or a cancelled handler aborts the request in the engine, freeing its slot.

Endpoints: ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``. Errors are answered in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 503 when the queue is full or the
server is stopping, 504 when a request outlives its timeout, 413 (before reading it) for a body over the size limit,
408 for a request line and headers, or a body, that do not arrive within the request timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import h11
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from mamba2.serving.engine import Engine, Prefix, RequestOutput
from mamba2.serving.sampling import SamplingParams
from mamba2.serving.text import TextStream

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
NO_OP_FIELDS = {"echo": False, "presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "logit_bias": {},
                "suffix": "", "logprobs": None}
"""OpenAI completion fields that are not implemented but accepted with the value that does nothing (some clients
send every field); any other value is refused with 400."""


class APIError(Exception):
    """An error answered to the client with ``status`` and an OpenAI-style body naming ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ServerSettings:
    """What the server accepts.

    Attributes:
        model_name: the one model served (``model`` in requests and ``/v1/models``).
        max_len: prompt + max_tokens per choice at most.
        max_tokens_limit: max_tokens per request at most.
        max_queue: engine requests (choices) waiting or running at most; more are refused with 503.
        request_timeout: seconds a request may take; then it is aborted and answered 504 (408 while its body is
            still arriving).
        max_body_bytes: request bodies larger than this are answered 413: unread when their Content-Length says
            so, else as soon as the streamed body passes it (8 MiB: 256 prompts of 4096 token ids fit).
    """

    model_name: str
    max_len: int = 4096
    max_tokens_limit: int = 4096
    max_queue: int = 256
    request_timeout: float = 600.0
    max_body_bytes: int = 8 * 2 ** 20


# ---------------------------------------------------------------------------------------------- the engine thread
@dataclass
class Job:
    """One engine request: choice ``index`` of an HTTP request whose outputs go to ``queue`` on ``loop``, as
    ``(index, RequestOutput)`` or ``(index, exception)``."""

    request_id: str
    index: int
    prompt: list[int]
    params: SamplingParams
    stream: bool
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    prefix: Prefix | None = None

    def deliver(self, item: RequestOutput | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))
        except RuntimeError:         # the event loop has closed: nobody is waiting any more
            pass


class EngineWorker:
    """Runs an :class:`Engine` in one thread; every other thread talks to it through :meth:`submit` and
    :meth:`abort` only.

    Args:
        engine: not used by any other thread once :meth:`start` is called.
        max_queue: jobs submitted and not yet finished at most.
    """

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._aborts: list[str] = []
        self._stopping = False
        self._outstanding = 0          # submitted and not finished: the queue bound counts these
        self._jobs: dict[str, Job] = {}  # the engine thread's own: jobs added to the engine
        self.running = 0               # requests holding a slot after the last step (for /health)
        self.on_stop: Callable[[], None] | None = None   # called (from the stopping thread) when stop() begins
        self._thread = threading.Thread(target=self._loop, name="mamba2-engine", daemon=True)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has begun (new requests are refused)."""
        return self._stopping

    @property
    def waiting(self) -> int:
        """Submitted requests that do not hold a slot (yet)."""
        return max(0, self._outstanding - self.running)

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs, all or none.

        Raises:
            APIError: 503 when the queue would exceed ``max_queue`` or the server is stopping.
        """
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down")
            if self._outstanding + len(jobs) > self.max_queue:
                raise APIError(503, f"the server is busy: {self._outstanding} requests are queued or running "
                                    f"(--max-queue {self.max_queue}); retry later")
            self._outstanding += len(jobs)
            self._inbox.extend(jobs)
            self._cond.notify()

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (finished or unknown ones are ignored); their slots are free at the next step."""
        if request_ids:
            with self._cond:
                self._aborts.extend(request_ids)
                self._cond.notify()

    def stop(self, wait: bool = True) -> None:
        """Refuse new requests, abort every request (their handlers get a 503 error) and end the thread; ``wait``
        for it to end."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.on_stop is not None:
            self.on_stop()
        if wait and self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        if self.engine.device.type == "cuda":     # the current CUDA device is per thread: graphs capture on it
            torch.cuda.set_device(self.engine.device)
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._stopping or self.engine.has_work()):
                    self._cond.wait()
                jobs, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for job in jobs:                   # before the aborts: a job may be aborted before it was added
                try:
                    self.engine.add_request(job.prompt, job.params, request_id=job.request_id, stream=job.stream,
                                            prefix=job.prefix)
                    self._jobs[job.request_id] = job
                except ValueError as e:
                    self._done(job, APIError(400, str(e), "prompt"))
            for request_id in aborts:
                if request_id in self._jobs:
                    self.engine.abort(request_id)
                    self._done(self._jobs[request_id])
            if stopping:
                for request_id, job in list(self._jobs.items()):
                    self.engine.abort(request_id)
                    self._done(job, APIError(503, "the server is shutting down"))
                return
            if self.engine.has_work():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:      # the engine's state is unknown now: end every request rather than hang them
            log.exception("engine step failed")
            for request_id, job in list(self._jobs.items()):
                self.engine.abort(request_id)
                self._done(job, APIError(500, f"the engine failed: {type(e).__name__}: {e}"))
            return
        self.running = self.engine.num_running
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is None:
                continue
            job.deliver(out)
            if out.finished:
                self._done(job)

    def _done(self, job: Job, error: Exception | None = None) -> None:
        if error is not None:
            job.deliver(error)
        self._jobs.pop(job.request_id, None)
        with self._cond:
            self._outstanding -= 1
        self.running = self.engine.num_running


# ---------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (OpenAI's field names; ``top_k``, ``min_p``, ``repetition_penalty``
    and ``ignore_eos`` as in vLLM). A null field counts as not given. ``prompt`` becomes a list of prompts, each
    text or token ids."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: list[str | list[int]]
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        """Null fields, and OpenAI fields we do not implement sent with their no-op value, count as not given."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None and not _is_no_op(k, v)}

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        def ids(x):
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or ids(v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or ids(p) for p in v):
            return v
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids (integers), or a "
                         "list of such lists" + (" (got an empty list)" if v == [] else ""))

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or len(v) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in v):
            raise ValueError(f"must be a string or a list of at most {MAX_STOP_STRINGS} strings")
        if "" in v:                     # as generate's --stop '': it would match before the first token
            raise ValueError("must not contain an empty string (it would stop before the first token)")
        return v


def _is_no_op(field: str, value: Any) -> bool:
    if field not in NO_OP_FIELDS:
        return False
    default = NO_OP_FIELDS[field]
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and value == default
    return value == default


def _validation_message(err: ValidationError) -> APIError:
    """The first pydantic error as one line naming the field."""
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"]) or None
    if e["type"] == "extra_forbidden":
        if field in NO_OP_FIELDS:
            return APIError(400, f"'{field}' is not implemented: only its no-op value "
                                 f"{json.dumps(NO_OP_FIELDS[field])} is accepted, got {json.dumps(e['input'])}", field)
        return APIError(400, f"unsupported field '{field}'", field)
    if e["type"] == "missing":
        return APIError(400, f"'{field}' is required", field)
    if field is None:
        return APIError(400, "the request body must be a JSON object")
    msg = e["msg"].removeprefix("Value error, ")
    return APIError(400, f"'{field}' {msg[0].lower()}{msg[1:]}, got {json.dumps(e.get('input'), default=str)[:80]}",
                    field)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes: from its
    Content-Length before any of it is read, or while a chunked body streams in."""
    too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                            "(--max-body-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_big
            parts.append(part)
    except ClientDisconnect:            # nobody is left to answer; not an error of the server
        raise APIError(400, "the client disconnected before sending the whole body") from None
    return b"".join(parts)


async def _parse(request: Request, limit: int) -> CompletionRequest:
    body = await _read_body(request, limit)
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as e:           # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise APIError(400, f"the request body holds a number that cannot be read: {e}") from None
    try:
        return CompletionRequest.model_validate(obj)
    except ValidationError as e:
        raise _validation_message(e) from None


# ---------------------------------------------------------------------------------------------- completions
@dataclass
class _Choice:
    request_id: str
    text: TextStream
    tokens: int = 0
    finish_reason: str | None = None


class _Completion:
    """The engine requests (choices) of one HTTP request, and their text as the worker hands over tokens."""

    def __init__(self, worker: EngineWorker, jobs: list[Job], tokenizer: Any, stops: list[str],
                 stop_ids: tuple[int, ...], timeout: float):
        self.worker, self.queue, self.timeout = worker, jobs[0].queue, timeout
        self.choices = [_Choice(j.request_id, TextStream(tokenizer, stops, skip_ids=stop_ids)) for j in jobs]
        worker.submit(jobs)

    async def updates(self, request: Request) -> AsyncIterator[tuple[int, str, str | None]]:
        """``(choice index, new text, finish_reason or None)`` as text becomes final, until every choice has
        finished or the client has gone. However it ends (disconnect, timeout, a cancelled handler), what is left
        is aborted in the engine.

        Raises:
            APIError: 504 at the timeout; the worker's error (400 from the engine, 503 when stopping, 500).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        gone = asyncio.ensure_future(_disconnected(request))
        get = None
        try:
            while any(c.finish_reason is None for c in self.choices):
                get = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait((get, gone), timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    if gone in done:
                        return
                    raise APIError(504, f"the request took longer than {self.timeout:g} s (--request-timeout) "
                                        "and was aborted")
                index, out = get.result()
                if isinstance(out, Exception):
                    raise out
                update = self._take(index, out)
                if update is not None:
                    yield update
        finally:
            gone.cancel()
            if get is not None:
                get.cancel()
            self.close()

    def close(self) -> None:
        """Abort the choices that have not finished (their slots are free at the next step)."""
        self.worker.abort([c.request_id for c in self.choices if c.finish_reason is None])

    def _take(self, index: int, out: RequestOutput) -> tuple[int, str, str | None] | None:
        c = self.choices[index]
        if c.finish_reason is not None:            # tokens that arrived after a stop string
            return None
        c.tokens += len(out.new_tokens)
        new = c.text.add(out.new_tokens)
        if c.text.stopped:
            c.finish_reason = "stop"
            self.worker.abort([c.request_id])
        elif out.finished:
            new += c.text.finish()               # a stop string may end in a U+FFFD made final only now
            c.finish_reason = "stop" if c.text.stopped else out.finish_reason
        return (index, new, c.finish_reason) if new or c.finish_reason else None


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: Any) -> str:
    """One server-sent event. ASCII-escaped JSON: generated text may hold U+2028, U+0085 and the like, which many
    clients (httpx, anything built on str.splitlines) take for line ends, cutting the event in two."""
    return f"data: {json.dumps(obj)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that close their completion however the response ends: also when it is cancelled
    (a client gone at once) before the first event is made."""

    def __init__(self, events: AsyncIterator[str], completion: _Completion):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.completion = completion

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.completion.close()


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine: Engine, tokenizer: Any, settings: ServerSettings,
               on_ready: Callable[[], None] | None = None, prefixes: tuple[Prefix, ...] = ()) -> FastAPI:
    """The FastAPI app serving ``engine`` (which it owns from now on, in its worker thread).

    Args:
        tokenizer: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``eos_token_id`` (ends a request).
        on_ready: called once the worker thread runs.
        prefixes: prefix states made by ``engine.make_prefix`` (system prompts, few-shot headers): a prompt whose
            token ids start with one of them prefills only the rest, from the longest such prefix; the response's
            ``usage.prompt_tokens_details.cached_tokens`` says how many tokens came from it.
    """
    by_length = sorted(prefixes, key=lambda p: len(p.ids), reverse=True)

    def prefix_of(ids: list[int]) -> Prefix | None:
        return next((p for p in by_length if len(p.ids) <= len(ids) and tuple(ids[:len(p.ids)]) == p.ids), None)

    worker = EngineWorker(engine, settings.max_queue)
    vocab = engine.model.config.vocab_size
    eos = tokenizer.eos_token_id
    stop_ids = () if eos is None else (eos,)
    created = int(time.time())

    stopped = asyncio.Event()          # set once the worker stops: requests still reading their body end then

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        worker.on_stop = lambda: loop.call_soon_threadsafe(stopped.set)
        worker.start()
        if on_ready is not None:
            on_ready()
        yield
        worker.stop()

    app = FastAPI(title="mamba2", lifespan=lifespan)
    app.state.worker = worker
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        # a 413 or 408 may come before the body was read: the connection cannot carry another request after it
        # (nor should it while the server stops)
        close = {"Connection": "close"} if e.status in (408, 413) or worker.stopping else None
        return JSONResponse(e.body(), status_code=e.status, headers=close)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    @app.api_route("/health", methods=["GET", "HEAD"])      # HEAD: load balancers' health checks
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": worker.running, "waiting": worker.waiting}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "mamba2", "max_model_len": settings.max_len}]}

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            try:
                ids = tokenizer.encode(prompt)
            except UnicodeEncodeError as e:
                raise APIError(400, f"the prompt is not valid Unicode text: {e.reason} at character {e.start}",
                               "prompt") from None
        else:
            ids = prompt
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", "prompt")
        return ids

    def sampling(body: CompletionRequest, seed: int | None) -> SamplingParams:
        if not 0 <= body.max_tokens <= settings.max_tokens_limit:
            raise APIError(400, f"max_tokens must be an integer in [0, {settings.max_tokens_limit}], got "
                                f"{body.max_tokens}", "max_tokens")
        try:
            return SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k,
                                  min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=seed,
                                  stop_token_ids=() if body.ignore_eos else stop_ids)
        except ValueError as e:                 # "top_p must be …": the message starts with the field
            raise APIError(400, str(e), str(e).split(" ", 1)[0]) from None

    async def read_body(request: Request) -> CompletionRequest:
        """The parsed body; a body that never completes (a stalled or slow client) must not hold the connection
        for ever: 408 at the request timeout, 503 once the server stops (it would hold the shutdown)."""
        parse = asyncio.ensure_future(_parse(request, settings.max_body_bytes))
        stop = asyncio.ensure_future(stopped.wait())
        try:
            done, _ = await asyncio.wait({parse, stop}, timeout=settings.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            parse.cancel()       # no-op once done
        if parse in done:
            return parse.result()
        if stop in done:
            raise APIError(503, "the server is shutting down")
        raise APIError(408, f"the request body did not arrive within {settings.request_timeout:g} s "
                            "(--request-timeout)")

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        raise APIError(404, "chat completions are not served: this server continues text (a base model, no chat "
                            "template); send the conversation as text to POST /v1/completions as 'prompt'")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request)
        if body.model is not None and body.model != settings.model_name:
            raise APIError(400, f"model '{body.model}' is not served here; this server serves "
                                f"'{settings.model_name}'", "model")
        if body.n < 1:
            raise APIError(400, f"n must be an integer >= 1, got {body.n}", "n")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        if len(body.prompt) * body.n > settings.max_queue:
            raise APIError(400, f"{len(body.prompt)} prompt(s) × n={body.n} completions can never fit the server's "
                                f"queue of {settings.max_queue} (--max-queue)", "n" if body.n > 1 else "prompt")
        if body.seed is not None and body.n > 1 and 0 <= body.seed and body.seed + body.n > 2 ** 63:
            raise APIError(400, f"seed must be an integer in [0, 2**63 - n] with n={body.n} (choice j uses seed + "
                                f"j), got {body.seed}", "seed")
        params = [sampling(body, None if body.seed is None else body.seed + j) for j in range(body.n)]
        prompts = [encode(p) for p in body.prompt]
        for ids in prompts:
            if len(ids) + body.max_tokens > settings.max_len:
                raise APIError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({body.max_tokens}) exceeds the "
                                    f"server's limit of {settings.max_len} tokens (--max-len)", "prompt")
        cid = f"cmpl-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        engine_stream = body.stream or bool(body.stop)        # stop strings are checked as tokens arrive
        cached = [prefix_of(ids) for ids in prompts]
        jobs = [Job(f"{cid}-{i * body.n + j}", i * body.n + j, ids, p, engine_stream, queue, loop, cached[i])
                for i, ids in enumerate(prompts) for j, p in enumerate(params)]
        completion = _Completion(worker, jobs, tokenizer, body.stop, stop_ids, settings.request_timeout)
        head = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": settings.model_name}
        prompt_tokens = sum(len(ids) for ids in prompts)

        cached_tokens = sum(len(c.ids) for c in cached if c is not None)

        def usage() -> dict[str, Any]:
            n = sum(c.tokens for c in completion.choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
                    "prompt_tokens_details": {"cached_tokens": cached_tokens}}

        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events() -> AsyncIterator[str]:
                try:
                    async for index, text, reason in completion.updates(request):
                        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
                        yield _sse({**head, "choices": [choice], **({"usage": None} if with_usage else {})})
                    if with_usage:
                        yield _sse({**head, "choices": [], "usage": usage()})
                except APIError as e:
                    yield _sse(e.body())
                yield "data: [DONE]\n\n"

            return _EventStream(events(), completion)

        texts = [""] * len(jobs)
        async for index, text, _ in completion.updates(request):
            texts[index] += text
        if any(c.finish_reason is None for c in completion.choices):   # the client has gone
            return Response(status_code=499)
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": c.finish_reason}
                   for i, (t, c) in enumerate(zip(texts, completion.choices))]
        return JSONResponse({**head, "choices": choices, "usage": usage()})

    return app


# ---------------------------------------------------------------------------------------------- running it
def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


class _HeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's line and headers: a new connection, or the
    first bytes of a next request on a kept-alive one, that has not brought a whole request head ``head_timeout``
    seconds later is answered 408 and closed. uvicorn itself waits for ever there (its keep-alive timer stops at
    the first byte), so a client that stalls mid-header would hold its connection and socket for the server's
    lifetime."""

    head_timeout = 600.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:      # a whole request head has arrived (or the peer is gone)
            self._cancel_head_deadline()

    def data_received(self, data: bytes) -> None:
        # the first bytes of the next request on a kept-alive connection (an idle one is uvicorn's keep-alive's)
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        # h11 sends a response only to a request it has parsed: this one is written as raw bytes
        body = json.dumps(APIError(408, f"the request line and headers did not arrive within {self.head_timeout:g} "
                                        "s (--request-timeout)").body()).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn, ending the requests still running ``grace`` seconds after its shutdown begins, or at a second
    SIGINT/SIGTERM: the engine thread stops, and each handler answers 503 (a stream: an error event), so that every
    connection closes cleanly."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, grace: float):
        super().__init__(config)
        self.worker, self.grace = worker, grace
        self.early_signals: list[int] = []     # SIGINT/SIGTERM received before uvicorn took the signals over

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        for sig in self.early_signals:          # a stop before uvicorn listened for one is still a stop
            self.handle_exit(sig, None)
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # a second signal during the grace period: end the running requests now (each still answered 503) instead
        # of uvicorn's forced exit, which cancels their handlers and cuts their connections
        if self.should_exit:
            self.worker.stop(False)
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.grace, self.worker.stop, False)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def run(app: FastAPI, sock: socket.socket, *, shutdown_timeout: float = 10.0) -> None:
    """Serve ``app`` (from :func:`create_app`) on ``sock`` until SIGINT or SIGTERM; then stop accepting, give
    running requests ``shutdown_timeout`` seconds to finish, end the rest, stop the engine thread and return."""
    # uvicorn's own limit is a backstop: it cancels handlers, which cuts their connections
    protocol = type("HeadDeadlineH11", (_HeadDeadline,), {"head_timeout": app.state.settings.request_timeout})
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout + 5)
    server = _Server(config, app.state.worker, shutdown_timeout)
    # until uvicorn installs its handlers, a signal is kept for it (its startup acts on it); uvicorn re-raises the
    # signal it handled once it has shut down, when it has been handled: then it is only recorded
    previous = {s: signal.signal(s, lambda sig, _: server.early_signals.append(sig))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

