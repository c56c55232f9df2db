"""Exactness and integrity of reuse through the HTTP API on the real default
model: retokenized history (C7), concurrent requests (C8), a worker killed
mid-store (C10), a poison checkpoint (C11), and the `kvrouter cache` tools."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import mlx.core as mx
import openai
import pytest

from kvrouter.cachestore import CheckpointStore, StoreConfig
from kvrouter.cachestore.payload import checksum_file
from tests.support.prompts import long_system_prompt
from tests.support.reference import chat_tokens, greedy_in_subprocess
from tests.support.replay import Step, replay
from tests.support.server import STORE_CASE_FLAGS, openai_client as client, child_pids

from kvrouter.worker.launch import module_command

MODEL = "SmolLM2-135M-Instruct"
FLAGS = [*STORE_CASE_FLAGS,
         "--kv-cache-ram-mb", "0"]  # every restore reads the disk payload (C10, C11 are about files)


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def server(start_server, kv_dir):
    return start_server("--kv-cache-dir", str(kv_dir), *FLAGS, name="integrity")




def cache_cli(kv_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*module_command("kvrouter.router.cli"), "cache", *args, "--kv-cache-dir", str(kv_dir)],
                          capture_output=True, text=True, timeout=120)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_retokenized_history_reuses_exactly_up_to_the_first_differing_token(server):
    """C7: the client sends the reply back with one changed space; reuse of the
    live state (prompt + generated tokens) reaches the first differing token and
    never past it."""
    system = long_system_prompt(10, project="Fornax")
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Say hello to the team."}]
    ref = greedy_in_subprocess(turn1, 12)
    assert ref.min_margin > 1e-3
    c = client(server)
    first = replay(c, MODEL, [Step("t1", turn1, 12)])["t1"]
    assert first.text == ref.text
    altered = ref.text.replace(" ", "  ", 1)  # one space doubled: tokenizes differently from what was generated
    assert altered != ref.text
    turn2 = turn1 + [{"role": "assistant", "content": altered}, {"role": "user", "content": "Thanks."}]
    second = replay(c, MODEL, [Step("t2", turn2, 2)])["t2"]
    live = chat_tokens(turn1) + list(ref.tokens[:-1])  # the last generated token was never fed
    expected = common_prefix(chat_tokens(turn2), live)
    assert len(chat_tokens(turn1)) <= expected < len(live)
    assert second.cached_tokens == expected


def test_concurrent_requests_match_their_sequential_runs(server):
    """C8: 16 concurrent requests share a prefix, each with its own fact; every
    answer equals the same request sent alone."""
    system = long_system_prompt(12, project="Grus")
    animals = ["cat", "dog", "owl", "fox", "bee", "cow", "elk", "yak",
               "ant", "bat", "eel", "hen", "pig", "ram", "emu", "ape"]
    requests = [[{"role": "system", "content": system},
                 {"role": "user", "content": f"The secret animal is the {a}. What is the secret animal?"}]
                for a in animals]
    c = client(server)

    def ask(msgs):
        return c.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=8)

    with ThreadPoolExecutor(16) as pool:
        together = [r.choices[0].message.content for r in pool.map(ask, requests)]
    alone = [ask(m).choices[0].message.content for m in requests]
    assert together == alone
    assert sum(a in text for a, text in zip(animals, alone)) >= 12, alone  # answers speak of their own fact


def test_worker_killed_mid_store_leaves_a_valid_store(server, kv_dir):
    """C10: kill -9 the worker while it writes checkpoints; after the supervisor
    restarts it, every row validates and output equals a cold run."""
    system = long_system_prompt(45, project="Hydra")  # ~1100 tokens: anchor + waypoints 512, 1024
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name the project."}]
    payloads = kv_dir / "payloads"
    before = set(os.listdir(payloads))
    worker = child_pids(server.proc.pid)[0]
    killed = threading.Event()

    def kill_when_writing():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed.is_set():
            if any(".tmp" in n or n not in before for n in os.listdir(payloads)):
                os.kill(worker, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=kill_when_writing)
    watcher.start()
    with pytest.raises(openai.APIError):
        client(server).chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=4)
    watcher.join()
    assert killed.is_set()
    deadline = time.monotonic() + 180
    while True:  # wait for the restarted worker
        try:
            again = client(server).chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=8)
            break
        except openai.APIError:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(1)
    verify = cache_cli(kv_dir, "verify")
    assert verify.returncode == 0, verify.stdout
    ref = greedy_in_subprocess(msgs, 8)
    assert ref.min_margin > 1e-3
    assert again.choices[0].message.content == ref.text


def test_poison_checkpoint_is_quarantined_and_never_loaded_again(server, kv_dir):
    """C11: a checkpoint that passes the checksum and header checks but makes
    prefill fail is quarantined on first use; the request succeeds cold."""
    system = long_system_prompt(14, project="Indus")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}]
    other = [{"role": "user", "content": "Say yes."}]
    c = client(server)
    replay(c, MODEL, [Step("cold", msgs, 2), Step("o1", other, 2)])  # anchor, then evict checkpoint
    with CheckpointStore(StoreConfig(directory=kv_dir)) as store:
        prompt = chat_tokens(msgs)
        entry = store.lookup(store.entries()[0].model_id, "", prompt).entry  # the longest: the next request loads it
        path = store.payload_dir / entry.payload_name
        arrays, meta = mx.load(str(path), return_metadata=True)
        # Same layer count, token count and metadata; a wrong head size breaks attention.
        bad = {k: mx.zeros((*v.shape[:3], v.shape[3] // 2), v.dtype) if v.ndim == 4 else v for k, v in arrays.items()}
        mx.save_safetensors(str(path), bad, metadata=meta)
        fixed = replace(entry, payload_bytes=path.stat().st_size, checksum=checksum_file(path))
        store.index.write(lambda txn: txn.update_row(fixed))
        store.index.write(lambda txn: txn.recount())  # the byte counters follow the edited row
    recs = replay(c, MODEL, [Step("poisoned", msgs, 2), Step("o2", other, 2), Step("after", msgs, 2)])
    assert recs["poisoned"].text  # the request succeeded...
    assert recs["poisoned"].cached_tokens == 0  # ...cold, after the poison failed its prefill
    assert recs["after"].text == recs["poisoned"].text
    with CheckpointStore(StoreConfig(directory=kv_dir)) as store:
        row = store.get(entry.id)
    assert row.quarantined, "the poison checkpoint must be quarantined"
    assert "quarantined id=" + entry.id in server.log_path.read_text()
    assert server.log_path.read_text().count("hit id=" + entry.id) == 1, "loaded once, never again"


def test_cache_cli_lists_shows_and_removes_a_namespace(server, kv_dir):
    system = long_system_prompt(8, project="Lyra")
    replay(client(server), MODEL, [Step("lyra", [{"role": "system", "content": system},
                                                 {"role": "user", "content": "Hi."}], 2)])
    ls = cache_cli(kv_dir, "ls", "--json")
    assert ls.returncode == 0
    rows = json.loads(ls.stdout)
    assert any(r["text_preview"].startswith("<|im_start|>system\nYou are the build assistant of the Lyra")
               for r in rows), rows
    assert rows and {"kind", "namespace", "n_tokens", "payload_bytes", "hits", "last_used"} <= set(rows[0])
    table = cache_cli(kv_dir, "ls")
    assert rows[0]["id"][:12] in table.stdout and "entries" in table.stdout
    show = cache_cli(kv_dir, "show", rows[0]["id"][:10])
    assert show.returncode == 0 and json.loads(show.stdout)["id"] == rows[0]["id"]
    rm = cache_cli(kv_dir, "rm", "--namespace", "")
    assert rm.returncode == 0, rm.stdout + rm.stderr
    assert int(rm.stdout.split()[1]) >= len(rows), rm.stdout
    assert json.loads(cache_cli(kv_dir, "ls", "--json").stdout) == []
    assert cache_cli(kv_dir, "verify").returncode == 0
