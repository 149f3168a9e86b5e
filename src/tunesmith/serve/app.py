"""The OpenAI-compatible HTTP server (FastAPI) and the playground page.

Requests are parsed by hand (size cap, JSON, strict schema) so every failure gets an OpenAI-style error
body with the right status. Generation happens in the scheduler's worker thread; handlers only await.
No endpoint takes a file path: models are loaded once, at startup, from the config.

Limits, as OpenAI clients expect them: a prompt that fills the context, or an explicit max_tokens (or
max_completion_tokens) that does not fit after the prompt, is a 400 with code context_length_exceeded; with
no max_tokens the answer may use the room left (up to generate.max_new_tokens and serve.max_tokens_cap) and
finish_reason "length" says it was cut. A client that hangs up (streaming or not) frees its batch row; a
failure after a stream's 200 arrives as a last `data: {"error": ...}` event, with no [DONE].
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.config import Config, GenerateConfig, UserError
from tunesmith.generate import Completion, conversation_ids
from tunesmith.serve.llama_cpp import GgufModel
from tunesmith.serve.models import load_models, model_specs
from tunesmith.serve.playground import example_questions, page
from tunesmith.serve.rag import ServeRag, fit, open_serve_rag, retrieval_json
from tunesmith.serve.scheduler import LoadedModel, Scheduler
from tunesmith.serve.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_body,
    chunk,
    completion_body,
    new_id,
    validation_message,
)


def create_app(
    cfg: Config,
    models: dict[str, LoadedModel | GgufModel],
    examples: list[str] | None = None,
    rag: ServeRag | None = None,
) -> FastAPI:
    """The app serving `models` by name; `examples` are the playground's one-click questions; `rag` puts
    retrieved passages into every chat request's last user turn and returns them in `retrieval`."""
    if not models:
        raise UserError(
            "serve.models: no model to serve (name one, e.g. serve.models={base: smollm2-135m-instruct})"
        )
    # GGUF models under serve.engine llama.cpp run on their own worker (serve/llama_cpp.py), not in batches
    ours = {n: m for n, m in models.items() if not isinstance(m, GgufModel)}
    sched = Scheduler(ours, cfg.serve.max_batch_size, cfg.serve.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        yield
        sched.close()

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler = sched
    key = _api_key(cfg)
    check_auth = _auth_check(key)
    _error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(models)}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page(list(models), examples or [], auth=key is not None))

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        check_auth(request)
        return {
            "object": "list",
            "data": [_card(n, m) for n, m in models.items()],
        }

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict:
        check_auth(request)
        return _card(name, _model(models, name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req = await _parse(request, CompletionRequest, cfg.serve.max_request_bytes)
        lm = _model(models, req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request", param="prompt")
        if isinstance(lm, GgufModel):
            ids = lm.encode(prompts[0])
        else:
            ids = lm.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        return await _answer(
            request,
            sched,
            lm,
            req,
            ids,
            _gen_cfg(cfg, req, lm, ids, req.max_tokens, "max_tokens"),
            chat=False,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req = await _parse(request, ChatRequest, cfg.serve.max_request_bytes)
        lm = _model(models, req.model)
        if not any(m.role == "user" for m in req.messages):
            raise ApiError(400, "messages: at least one message with role 'user' is needed", param="messages")
        limit, param = (
            (req.max_completion_tokens, "max_completion_tokens")
            if req.max_completion_tokens
            else (req.max_tokens, "max_tokens")
        )
        ids, extra = await _chat_prompt(cfg, lm, rag, [m.model_dump() for m in req.messages], limit)
        gcfg = _gen_cfg(cfg, req, lm, ids, limit, param)
        return await _answer(request, sched, lm, req, ids, gcfg, chat=True, extra=extra)

    return app


async def _chat_prompt(
    cfg: Config, lm: LoadedModel, rag: ServeRag | None, messages: list[dict], limit: int | None
) -> tuple[list[int], dict | None]:
    """(prompt ids, extra response fields): with serve.rag, the best passages that fit the context go in the
    last user turn and come back in `retrieval`; a conversation the template cannot render is a 400.

    A string template renders earlier user/assistant pairs as few-shot examples (`conversation_ids`)."""
    answer_room = limit or min(cfg.generate.max_new_tokens, cfg.serve.max_tokens_cap)
    room = lm.context_len - answer_room
    render = lambda msgs: conversation_ids(lm.template, lm.tokenizer, msgs, room)  # noqa: E731
    if isinstance(lm, GgufModel):  # the GGUF's own chat template, through llama-cpp-python
        render = lm.chat_ids
    try:
        if rag is None:
            return render(messages), None
        hits = await asyncio.to_thread(rag.search, messages)  # embedding the query is CPU work: off the loop
        ids, hits = fit(messages, hits, render, room)
        return ids, {"retrieval": retrieval_json(hits)}
    except UserError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None


def _api_key(cfg: Config) -> str | None:
    """The Bearer token from serve.api_key_env (None: auth off); a named but empty variable is a UserError."""
    if not cfg.serve.api_key_env:
        return None
    key = os.environ.get(cfg.serve.api_key_env, "")
    if not key:
        raise UserError(
            f"serve.api_key_env: environment variable {cfg.serve.api_key_env} is empty or unset "
            "(export it, or remove serve.api_key_env)"
        )
    return key


def _auth_check(key: str | None):
    """request -> None, or ApiError(401) when auth is on and the Bearer token is missing or wrong."""

    def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        # constant-time comparison: response timing must not leak how much of the key was right
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise ApiError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
                kind="authentication_error",
            )

    return check


def _error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-style body: ours, routing's (404/405) and unexpected ones (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(
            ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        body = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body()
        return JSONResponse(body, status_code=500)


async def _parse(request: Request, schema: type, cap: int):
    """Body -> validated request: 413 over the size cap, 400 bad JSON, 422 wrong fields or types."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(
            413,
            f"request body is {declared} bytes; the limit is {cap} (serve.max_request_bytes)",
            code="request_too_large",
        )
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > cap:
            raise ApiError(
                413, f"request body is over {cap} bytes (serve.max_request_bytes)", code="request_too_large"
            )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:  # "\ud800" is valid JSON but no text: the tokenizer and the UTF-8 response could not take it
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"request body holds a lone surrogate escape ({e.object[e.start : e.end]!r}), which is not text",
            code="invalid_json",
        ) from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors()[0])
        raise ApiError(422, message, param=param, code="invalid_value") from None


def _card(name: str, lm: LoadedModel | GgufModel) -> dict:
    owner = "llama.cpp" if isinstance(lm, GgufModel) else "tunesmith"  # which engine answers
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


def _model(models: dict[str, LoadedModel | GgufModel], name: str) -> LoadedModel | GgufModel:
    if name not in models:
        raise ApiError(
            404,
            f"model '{name}' does not exist (served: {', '.join(models)})",
            param="model",
            code="model_not_found",
        )
    return models[name]


def _gen_cfg(
    cfg: Config, req, lm: LoadedModel, ids: list[int], max_tokens: int | None, param: str
) -> GenerateConfig:
    """Request settings over the config's generate section; limits checked against the model and the cap.

    As with OpenAI, an explicit max_tokens that does not fit in the context after the prompt is a 400
    (context_length_exceeded) rather than a silently shorter answer; without one, the answer gets the room
    that is left and finish_reason "length" says when it ran out.
    """
    cap, ctx = cfg.serve.max_tokens_cap, lm.context_len
    if max_tokens is not None and max_tokens > cap:
        raise ApiError(
            400, f"{param}={max_tokens} is over the server's cap of {cap} (serve.max_tokens_cap)", param=param
        )
    if not ids:
        raise ApiError(400, "the prompt renders to no tokens", param="prompt")
    if len(ids) >= ctx:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens; this model's context is {ctx}",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is not None and len(ids) + max_tokens > ctx:
        raise ApiError(
            400,
            f"this model's context is {ctx} tokens, but {len(ids)} (prompt) + {max_tokens} ({param}) were "
            f"asked for (ask for at most {ctx - len(ids)}, or shorten the prompt)",
            param=param,
            code="context_length_exceeded",
        )
    g = cfg.generate
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop if req.stop is not None else g.stop)
    limit = min(max_tokens or min(g.max_new_tokens, cap), ctx - len(ids))
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return g.model_copy(
        update={
            "max_new_tokens": limit,
            "temperature": pick(req.temperature, g.temperature),
            "top_p": pick(req.top_p, g.top_p),
            "top_k": pick(req.top_k, g.top_k),
            "repetition_penalty": pick(req.repetition_penalty, g.repetition_penalty),
            "stop": stop,
            "seed": pick(req.seed, g.seed),
        }
    )


async def _answer(
    request: Request,
    sched: Scheduler,
    lm: LoadedModel,
    req,
    ids: list[int],
    gcfg: GenerateConfig,
    chat: bool,
    extra: dict | None = None,
):
    """The response: one body, or an SSE stream; `extra` fields (serve.rag's `retrieval`) join the body, or
    the stream's first chunk."""
    rid = new_id("chatcmpl" if chat else "cmpl")
    engine = lm if isinstance(lm, GgufModel) else sched  # both: complete(name, ids, cfg) and stream(...)
    if not req.stream:
        try:
            c = await _unless_gone(request, engine.complete(lm.name, ids, gcfg))
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - answered here: one escaping to uvicorn resets the keep-alive connection
            raise _failed(e) from e
        return (chat_body if chat else completion_body)(rid, lm.name, c) | (extra or {})

    async def events():
        # Leaving this generator (client gone: the server cancels it) closes sched.stream: the row is freed.
        if chat:
            yield _sse(chunk(rid, lm.name, True, None) | (extra or {}))
        try:
            async for item in engine.stream(lm.name, ids, gcfg):
                final = item if isinstance(item, Completion) else None
                yield _sse(chunk(rid, lm.name, chat, None if final else item, final))
        except Exception as e:  # noqa: BLE001 - the 200 has gone out: the only way left to tell the client is an event
            yield _sse(_failed(e).body())
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _failed(e: Exception) -> ApiError:
    """A generation failure as a 500 for the client, with its traceback in the server's log."""
    logging.getLogger("uvicorn.error").error("generation failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


async def _unless_gone(request: Request, work):
    """Await `work`, cancelling it (which frees its batch row) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # no-op once done
    if not task.done() or task.cancelled():
        raise ApiError(499, "client closed the request", code="client_closed_request")  # nobody reads it
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is http.disconnect (hang-up, or after the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- `tunesmith serve` ----


def serve(cfg: Config) -> None:
    """`tunesmith serve`: load the models, then run uvicorn on serve.host:serve.port until interrupted."""
    import uvicorn

    if cfg.serve.host not in ("127.0.0.1", "localhost", "::1") and not cfg.serve.api_key_env:
        print(
            f"warning: serving on {cfg.serve.host} without auth "
            "(set serve.api_key_env to require a Bearer token)"
        )
    rag = open_serve_rag(cfg)  # before the models load: a bad corpus fails in seconds
    models = load_models(cfg, model_specs(cfg))
    app = create_app(cfg, models, example_questions(cfg), rag)
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")
