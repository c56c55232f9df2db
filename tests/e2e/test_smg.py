"""kvrouter workers behind the real Shepherd Model Gateway (PyPI `smg`), through
SMG's MLX worker protocol (`kvrouter worker --smg-listen`).

Two workers share one checkpoint store; `smg launch --policy cache_aware` routes
to them on loopback and the official `openai` client talks to SMG. SMG lives in
a virtual environment of its own (its own MLX servicer pins an older mlx-lm; the
gateway alone needs no model code), created on first use under the test cache
directory, or taken from $KVROUTER_SMG_BIN.

Output-equality case: as in test_slice.py, the reused prefix may end mid-chunk,
so the reference greedy run must have a top-2 logit margin above 1e-3 at every step.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import grpc
import openai
import pytest

from kvrouter.router.bench import smg as bench_smg
from tests.support.prompts import long_system_prompt
from tests.support.reference import chat_tokens, greedy_in_subprocess
from tests.support.server import SMALL_KV_FLAGS, free_port, model_cache_dir

from kvrouter.worker.launch import module_command

SMG_VERSION = bench_smg.SMG_VERSION
MODEL = "SmolLM2-135M-Instruct"
SYSTEM = long_system_prompt(n_rules=30)  # about 730 tokens
SESSION_A = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does rule 3 say?"}]
SESSION_B = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+2?"}]
SESSION_C = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which rule is about the parser?"}]
MAX_TOKENS = 8
START_TIMEOUT_S = 300


def smg_binary() -> Path:
    """The `smg` executable: $KVROUTER_SMG_BIN, or a venv of its own with only `smg` in it
    (router.bench.smg, shared with `kvrouter bench --compare`)."""
    try:
        return bench_smg.smg_binary(model_cache_dir(), install=True)
    except bench_smg.SmgUnavailable as exc:
        pytest.fail(str(exc))


class Proc:
    """A subprocess with its log file."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self._fh = open(log, "ab")
        # Its own process group: `smg launch` runs the gateway in a child process, and
        # stopping the group leaves neither behind.
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig=signal.SIGTERM) -> None:
        self._signal_group(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self._signal_group(signal.SIGKILL)  # any child the leader left behind
        self._fh.close()


def smg_stub(port: int):
    from smg_grpc_proto.generated import mlx_engine_pb2_grpc

    return mlx_engine_pb2_grpc.MlxEngineStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def wait_healthy(worker: Proc, port: int) -> None:
    from smg_grpc_proto.generated import mlx_engine_pb2

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.tail()}")
        try:
            if smg_stub(port).HealthCheck(mlx_engine_pb2.HealthCheckRequest(), timeout=2).healthy:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"worker not healthy after {START_TIMEOUT_S} s:\n{worker.tail()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two kvrouter workers (one shared store) behind `smg launch --policy cache_aware`."""
    smg = smg_binary()
    root = tmp_path_factory.mktemp("smg")
    procs: list[Proc] = []
    workers = []
    try:
        for name in ("w1", "w2"):
            port = free_port()
            w = Proc([*module_command("kvrouter.router.cli"), "worker", "--cache-dir", str(model_cache_dir()),
                      "--name", name, "--listen", "127.0.0.1:0", "--smg-listen", f"127.0.0.1:{port}",
                      "--kv-cache-dir", str(root / "kv"), *SMALL_KV_FLAGS], root / f"{name}.log")
            procs.append(w)
            workers.append({"name": name, "proc": w, "port": port})
        for w in workers:
            wait_healthy(w["proc"], w["port"])
        http_port = free_port()
        gw = Proc([str(smg), "launch", "--host", "127.0.0.1", "--port", str(http_port),
                   "--worker-urls", *[f"grpc://127.0.0.1:{w['port']}" for w in workers],
                   "--policy", "cache_aware", "--health-check-interval-secs", "1",
                   "--health-failure-threshold", "1", "--log-level", "info"], root / "smg.log")
        procs.append(gw)
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
        while True:  # ready once a tiny request goes through (workers found, tokenizer fetched)
            if not gw.alive():
                raise RuntimeError(f"smg exited:\n{gw.tail()}")
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0, max_tokens=1)
                break
            except (openai.APIError, openai.APIConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"smg not serving after {START_TIMEOUT_S} s:\n{gw.tail()}")
                time.sleep(1)
        yield {"client": client, "workers": workers, "gateway": gw, "url": url}
    finally:
        for p in procs:
            p.stop()


def stream_chat(client, messages):
    """(text, usage, seconds to first token) of a streamed temperature-0 chat completion."""
    t0 = time.perf_counter()
    first = None
    text, usage = "", None
    for ch in client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - t0
            text += ch.choices[0].delta.content
        if ch.usage:
            usage = ch.usage
    return text, usage, first


def served_by(cluster, request_count_before: dict) -> list[dict]:
    return [w for w in cluster["workers"]
            if w["proc"].log.read_text(errors="replace").count("smg request") > request_count_before[w["name"]]]


def request_counts(cluster) -> dict:
    return {w["name"]: w["proc"].log.read_text(errors="replace").count("smg request") for w in cluster["workers"]}


def test_shared_system_prompt_is_reused_through_smg_with_identical_output(cluster):
    client = cluster["client"]
    _, first, cold_ttft = stream_chat(client, SESSION_A)
    assert first.prompt_tokens >= 700
    # Cold: at most the few template tokens the readiness probe's prompt shares with it.
    assert first.prompt_tokens_details.cached_tokens < 16
    text, second, warm_ttft = stream_chat(client, SESSION_B)
    assert second.prompt_tokens_details.cached_tokens >= 512
    print(f"\nthrough SMG: {first.prompt_tokens}-token prompt, first token cold {cold_ttft:.2f} s, "
          f"reused ({second.prompt_tokens_details.cached_tokens} cached) {warm_ttft:.2f} s")

    ref = greedy_in_subprocess(SESSION_B, MAX_TOKENS)
    assert ref.min_margin > 1e-3, "pick a prompt without near-ties: a mid-chunk checkpoint could flip a token"
    assert second.prompt_tokens == ref.prompt_tokens  # SMG tokenizes exactly as kvrouter does
    assert text == ref.text


def test_smg_keeps_serving_after_a_worker_is_killed(cluster):
    """The worker that served the session dies; SMG sends the next request to the
    other one, which finds the session's anchor in the shared disk store."""
    client = cluster["client"]
    before = request_counts(cluster)
    stream_chat(client, SESSION_A)
    (victim,) = served_by(cluster, before)
    victim["proc"].stop(signal.SIGKILL)
    survivor = next(w for w in cluster["workers"] if w is not victim)

    before = request_counts(cluster)
    deadline = time.monotonic() + 60
    while True:
        try:
            text, usage, ttft = stream_chat(client, SESSION_C)
            break
        except (openai.APIError, openai.APIConnectionError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"SMG stopped serving: {exc}\n{cluster['gateway'].tail()}")
            time.sleep(1)
    assert text
    assert served_by(cluster, before) == [survivor]
    assert usage.prompt_tokens_details.cached_tokens >= 512  # loaded from the shared store
    print(f"\nafter the kill: {usage.prompt_tokens_details.cached_tokens} of {usage.prompt_tokens} tokens "
          f"from the other worker's checkpoint, first token {ttft:.2f} s")


def test_worker_speaks_the_rest_of_smgs_mlx_protocol(cluster):
    from smg_grpc_proto.generated import common_pb2, mlx_engine_pb2

    w = next(w for w in cluster["workers"] if w["proc"].alive())
    stub = smg_stub(w["port"])
    info = stub.GetModelInfo(mlx_engine_pb2.GetModelInfoRequest(), timeout=10)
    assert info.served_model_name == MODEL and info.max_context_length > 0 and info.eos_token_ids
    assert stub.GetServerInfo(mlx_engine_pb2.GetServerInfoRequest(), timeout=10).server_type == "kvrouter"

    chunks = list(stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=30))
    assert chunks[-1].sha256 and all(not c.sha256 for c in chunks[:-1])
    files = zipfile.ZipFile(io.BytesIO(b"".join(c.data for c in chunks)))
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"} <= set(files.namelist())
    from tokenizers import Tokenizer

    from tests.support.reference import reference_model

    messages = [{"role": "user", "content": "Count 12345 apples, then 678 pears."}]
    rendered = reference_model()[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    sent = Tokenizer.from_str(files.read("tokenizer.json").decode())
    assert sent.encode(rendered, add_special_tokens=False).ids == chat_tokens(messages)
    assert json.loads(files.read("tokenizer_config.json"))["chat_template"]

    # Abort: a long generation stops well before its max_tokens.
    prompt = chat_tokens([{"role": "user", "content": "Write a long story about a cat."}])
    req = mlx_engine_pb2.GenerateRequest(
        request_id="abort-me", stream=True, tokenized=mlx_engine_pb2.TokenizedInput(input_ids=prompt),
        sampling_params=mlx_engine_pb2.SamplingParams(temperature=0.0, max_tokens=400))
    stream = stub.Generate(req, timeout=120)
    got = 0
    for resp in stream:
        if resp.HasField("chunk"):
            got += 1
            if got == 2:
                stub.Abort(mlx_engine_pb2.AbortRequest(request_ids=["abort-me"]), timeout=10)
        else:
            break
    assert 2 <= got < 50

    # What the engine does not do is refused, not ignored.
    bad = mlx_engine_pb2.GenerateRequest(
        request_id="bad", tokenized=mlx_engine_pb2.TokenizedInput(input_ids=prompt),
        sampling_params=mlx_engine_pb2.SamplingParams(temperature=0.0, max_tokens=2, top_k=5))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(bad, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_check_fails_when_the_engine_thread_is_gone():
    from types import SimpleNamespace

    from smg_grpc_proto.generated import mlx_engine_pb2

    from kvrouter.worker.smg_servicer import SmgServicer

    bundle = SimpleNamespace(tokenizer_json=json.dumps({}), model=None)
    engine = SimpleNamespace(bundle=bundle, alive=False)
    servicer = SmgServicer.__new__(SmgServicer)  # no tokenizer needed for HealthCheck
    servicer.engine, servicer.shutting_down = engine, False
    resp = await servicer.HealthCheck(mlx_engine_pb2.HealthCheckRequest(), None)
    assert not resp.healthy and "not running" in resp.message
    engine.alive = True
    assert (await servicer.HealthCheck(mlx_engine_pb2.HealthCheckRequest(), None)).healthy


def test_chatml_anchor_is_the_last_user_turn_before_the_first_assistant_turn():
    from tests.support.reference import reference_model

    from kvrouter.worker.smg_servicer import ChatmlAnchor

    anchor = ChatmlAnchor.for_tokenizer(reference_model()[0].tokenizer_json)
    system = [{"role": "system", "content": SYSTEM}]
    tok = reference_model()[1]
    stable = len(tok.encode(tok.apply_chat_template(system, tokenize=False), add_special_tokens=False))
    assert anchor.anchor_tokens(chat_tokens(SESSION_B)) == stable
    later = system + [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]
    assert anchor.anchor_tokens(chat_tokens(later)) == stable
