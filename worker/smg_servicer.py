"""SMG's worker protocol, `mlx.grpc.engine.MlxEngine` (PyPI `smg-grpc-proto`),
served by a kvrouter worker on a second port (`kvrouter worker --smg-listen`).

The Shepherd Model Gateway (`smg launch --worker-urls grpc://HOST:PORT`) renders
and tokenizes prompts itself and sends token ids; this servicer hands them to
the same `worker.engine.Engine` that serves kvrouter's own protocol, so every
request gets the engine's prefix reuse (live state, RAM tier, disk store) and
`cached_tokens` reports it.

What SMG's MLX protocol asks that the engine does not do is refused with
INVALID_ARGUMENT rather than silently ignored: top_k, min_p, repetition /
frequency / presence penalties, logit_bias, logprobs, ignore_eos.
`stop_token_ids` are honoured here, by cancelling the engine job when one is
generated. Stop strings never arrive: SMG's MLX client rejects them.

The cold anchor (the stable chat prefix, see "The checkpoint store" in README.md) is found on
the token ids for ChatML templates: the position of the last user turn before
the first assistant turn. Other templates fall back to the store's trim/align rule.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from smg_grpc_proto.generated import common_pb2, mlx_engine_pb2, mlx_engine_pb2_grpc

from kvrouter.worker.servicer import submit_or_abort
from kvrouter.worker.events import ErrorEvent, FinishEvent, GenerationRequest, SamplingConfig, TokenEvent
from kvrouter.worker import smg_tokenizer
from kvrouter.worker.grpc_security import KEEPALIVE_SERVER_OPTIONS, TokenInterceptor, bind, check_exposure
from kvrouter.worker.grpc_strict import add_servicer

log = logging.getLogger("kvrouter.worker.smg")

SMG_SERVICE_NAME = "mlx.grpc.engine.MlxEngine"
SERVER_TYPE = "kvrouter"
_ABORTED_KEEP = 1024  # ids aborted before their Generate arrived, remembered at most


class ChatmlAnchor:
    """Finds the cold-anchor length of a ChatML prompt from its token ids.

    turn_start: id of `<|im_start|>`; user / assistant: the token ids of the role
    words that follow it. `ChatmlAnchor.for_tokenizer` returns None for other vocabularies.
    """

    def __init__(self, turn_start: int, user: tuple[int, ...], assistant: tuple[int, ...]):
        self.turn_start, self.user, self.assistant = turn_start, user, assistant

    @classmethod
    def for_tokenizer(cls, tokenizer_json: str) -> "ChatmlAnchor | None":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        start = tok.token_to_id("<|im_start|>")
        user, assistant = (tuple(tok.encode(word, add_special_tokens=False).ids) for word in ("user", "assistant"))
        if start is None or not user or not assistant:
            return None
        return cls(start, user, assistant)

    def anchor_tokens(self, prompt: list[int]) -> int:
        """Tokens before the last user turn that precedes the first assistant turn; 0 if none."""
        anchor = 0
        for i, token in enumerate(prompt):
            if token != self.turn_start:
                continue
            if tuple(prompt[i + 1 : i + 1 + len(self.assistant)]) == self.assistant:
                break
            if tuple(prompt[i + 1 : i + 1 + len(self.user)]) == self.user:
                anchor = i
        return anchor


def model_directory(spec: str | None) -> Path | None:
    """The mlx-lm model directory behind `--model` (a path or a cached HF repo id), else None."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path.suffix == ".gguf":
        return None
    try:
        from kvrouter.worker.models.resolve import hf_snapshot_path

        return hf_snapshot_path(spec)
    except Exception:  # not a cached repo: the bundle is written from the loaded model
        return None


def model_source(spec: str | None, cache_dir: Path) -> str:
    """The path reported as `model_path` (SMG tries it locally before asking GetTokenizer)."""
    directory = model_directory(spec)
    if directory is not None:
        return str(directory.resolve())
    if spec is None:
        from kvrouter.worker.models.resolve import default_model_path

        return str(default_model_path(cache_dir).resolve())
    return str(Path(spec).expanduser().resolve())


def sampling_from_proto(sp: mlx_engine_pb2.SamplingParams, room: int) -> SamplingConfig:
    """Validates SMG sampling params against what the engine does. Raises ValueError."""
    unsupported = [
        name for name, used in (
            ("top_k", sp.top_k > 0),
            ("min_p", sp.min_p > 0),
            ("repetition_penalty", sp.repetition_penalty not in (0.0, 1.0)),
            ("frequency_penalty", sp.frequency_penalty != 0),
            ("presence_penalty", sp.presence_penalty != 0),
            ("logit_bias", len(sp.logit_bias) > 0),
            ("logprobs", sp.HasField("logprobs")),
            ("ignore_eos", sp.ignore_eos),
        ) if used
    ]
    if unsupported:
        raise ValueError(f"kvrouter workers do not support {', '.join(unsupported)}")
    # Unset temperature means 1.0, as in SMG's own MLX servicer (and OpenAI).
    temperature = sp.temperature if sp.HasField("temperature") else 1.0
    top_p = sp.top_p or 1.0
    if temperature < 0 or not (0 < top_p <= 1):
        raise ValueError("temperature must be >= 0 and top_p within (0, 1]")
    max_tokens = sp.max_tokens if sp.HasField("max_tokens") else room
    return SamplingConfig(
        temperature=temperature,
        top_p=top_p,
        max_tokens=max(0, min(max_tokens, room)),
        seed=sp.seed if sp.HasField("seed") else None,
    )


class SmgServicer(mlx_engine_pb2_grpc.MlxEngineServicer):
    """Serves SMG's MlxEngine protocol from one kvrouter engine.

    engine: the running `worker.engine.Engine`; model_path: reported as
    `model_path` (see `model_source`); model_dir: an mlx-lm model directory
    whose tokenizer files are sent as they are, or None.
    """

    def __init__(self, engine, model_path: str, model_dir: Path | None = None):
        self.engine = engine
        self.bundle = engine.bundle
        self.model_path = model_path
        self.model_dir = model_dir
        self.started = time.time()
        self.jobs: dict[str, object] = {}  # request_id -> engine EngineJob, while streaming
        self._aborted: dict[str, None] = {}  # ordered set, bounded
        self._archive: tuple[bytes, str] | None = None
        self._anchor = ChatmlAnchor.for_tokenizer(self.bundle.tokenizer_json)
        self.shutting_down = False

    # -- Generate ---------------------------------------------------------------
    async def Generate(self, request, context):
        rid = request.request_id
        if request.WhichOneof("input") != "tokenized":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kvrouter workers take tokenized input only")
        prompt = tuple(int(t) for t in request.tokenized.input_ids)
        ctx = self.bundle.context_length
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input_ids is empty")
        if len(prompt) >= ctx:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt is {len(prompt)} tokens; the model's context is {ctx} tokens")
        try:
            sampling = sampling_from_proto(request.sampling_params, ctx - len(prompt))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if rid in self._aborted:  # aborted before it arrived
            del self._aborted[rid]
            return
        stop_ids = set(request.sampling_params.stop_token_ids)
        gen = GenerationRequest(
            request_id=rid,
            prompt=prompt,
            sampling=sampling,
            anchor_tokens=self._anchor.anchor_tokens(list(prompt)) if self._anchor else 0,
            text_preview=request.tokenized.original_text[:200],
        )
        job, events = await submit_or_abort(self.engine, gen, context)
        self.jobs[rid] = job
        output: list[int] = []
        matched: int | None = None
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, TokenEvent):
                    if not ev.token_ids or matched is not None:
                        continue
                    token = ev.token_ids[0]
                    output.append(token)
                    if token in stop_ids:
                        matched = token
                        job.cancelled.set()
                    if request.stream:
                        yield mlx_engine_pb2.GenerateResponse(chunk=mlx_engine_pb2.GenerateStreamChunk(
                            token_ids=[token], prompt_tokens=len(prompt),
                            completion_tokens=len(output), cached_tokens=0,
                        ))
                elif isinstance(ev, FinishEvent):
                    reason = "stop" if matched is not None else ev.finish_reason
                    if reason == "cancelled":
                        return  # Abort (or the client left): end the stream, as SMG's servicer does
                    complete = mlx_engine_pb2.GenerateComplete(
                        output_ids=[] if request.stream else output,
                        finish_reason=reason,
                        prompt_tokens=ev.usage.prompt_tokens,
                        completion_tokens=len(output),
                        cached_tokens=ev.usage.cached_tokens,
                    )
                    if matched is not None:
                        complete.matched_stop_token_id = matched
                    log.info("smg request %s: %d prompt tokens, %d cached (%s), %d generated, %s",
                             rid, ev.usage.prompt_tokens, ev.usage.cached_tokens, ev.usage.cache_source,
                             len(output), reason)
                    yield mlx_engine_pb2.GenerateResponse(complete=complete)
                    return
                elif isinstance(ev, ErrorEvent):
                    await context.abort(grpc.StatusCode.INTERNAL, ev.message)
        finally:
            job.cancelled.set()  # the client went away or we finished: stop the engine work
            self.jobs.pop(rid, None)

    async def Abort(self, request, context):
        for rid in request.request_ids:
            job = self.jobs.get(rid)
            if job is not None:
                job.cancelled.set()
            else:
                self._aborted[rid] = None
                while len(self._aborted) > _ABORTED_KEEP:
                    self._aborted.pop(next(iter(self._aborted)))
        return mlx_engine_pb2.AbortResponse()

    # -- state ------------------------------------------------------------------
    async def HealthCheck(self, request, context):
        if self.shutting_down:
            return mlx_engine_pb2.HealthCheckResponse(healthy=False, message="worker shutting down")
        if not self.engine.alive:
            return mlx_engine_pb2.HealthCheckResponse(healthy=False, message="generation thread is not running")
        return mlx_engine_pb2.HealthCheckResponse(healthy=True, message="OK")

    async def GetModelInfo(self, request, context):
        b = self.bundle
        args = getattr(b.model, "args", None)
        model_type = getattr(args, "model_type", "") or ""
        return mlx_engine_pb2.GetModelInfoResponse(
            model_path=self.model_path,
            is_generation=True,
            max_context_length=b.context_length,
            vocab_size=int(getattr(args, "vocab_size", 0) or 0),
            served_model_name=b.name,
            model_type=model_type,
            eos_token_ids=list(b.eos_token_ids),
            pad_token_id=0,
            bos_token_id=b.bos_token_id or 0,
            max_req_input_len=b.context_length - 1,
        )

    async def GetServerInfo(self, request, context):
        return mlx_engine_pb2.GetServerInfoResponse(
            server_type=SERVER_TYPE,
            active_requests=self.engine.queue_depth,
            uptime_seconds=time.time() - self.started,
        )

    async def GetTokenizer(self, request, context):
        if self._archive is None:
            try:
                self._archive = await asyncio.to_thread(self._build_archive)
            except Exception as exc:
                log.exception("cannot build the tokenizer bundle")
                await context.abort(grpc.StatusCode.INTERNAL, f"cannot build the tokenizer bundle: {exc}")
        data, sha = self._archive
        for piece, digest in smg_tokenizer.archive_chunks(data, sha):
            yield common_pb2.GetTokenizerChunk(data=piece, sha256=digest)

    def _build_archive(self) -> tuple[bytes, str]:
        b = self.bundle
        args = getattr(b.model, "args", None)
        files = smg_tokenizer.synthesized_files(
            b.tokenizer_json, b.chat_template, tuple(b.eos_token_ids), b.bos_token_id, b.context_length,
            getattr(args, "model_type", "") or "",
        )
        files.update(smg_tokenizer.directory_files(self.model_dir))
        return smg_tokenizer.build_archive(files)


def create_smg_server(address: str, engine, model_path: str, model_dir: Path | None = None, *,
                      token: str | None = None, tls: tuple[bytes, bytes] | None = None):
    """A grpc.aio server for SMG's MlxEngine (+ grpc.health.v1) bound to `address`.

    token: the worker token every call must carry (`authorization: Bearer`, what
    `smg launch --api-key TOKEN` sends); required when `address` is not loopback, like
    every worker port (`worker.grpc_security`). tls: (certificate chain PEM, key PEM).
    Returns (server, bound port, SmgServicer, health servicer). Raises ValueError for a
    non-loopback address without a token, RuntimeError when it cannot be bound.
    """
    check_exposure(address, token, "--smg-listen")
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * 2**20),
                                      ("grpc.max_receive_message_length", 64 * 2**20), *KEEPALIVE_SERVER_OPTIONS],
                             interceptors=[TokenInterceptor(token)] if token else [])
    servicer = SmgServicer(engine, model_path, model_dir)
    add_servicer(mlx_engine_pb2_grpc.add_MlxEngineServicer_to_server, servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, bind(server, address, tls), servicer, health_servicer

