"""A store on a real full filesystem (a small tmpfs) across real processes (issue 13, item 1):
requests succeed while checkpoint writes fail, the skips are counted with their reason,
a worker restarted on the full disk serves what the store holds, and a first open on a
full tmpfs (where LMDB's lock file used to kill the process with SIGBUS) runs without one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.prompts import long_system_prompt
from tests.support.server import STORE_CASE_FLAGS, openai_client
from tests.support.tmpfs import fill, mount_tmpfs, unmount

MODEL = "SmolLM2-135M-Instruct"
TMPFS_BYTES = 24 * 2**20  # about two checkpoints of these prompts (46 KB of KV per token)


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs mounts need Linux")
    target = tmp_path_factory.mktemp("full") / "mnt"
    target.mkdir()
    try:
        mount_tmpfs(target, TMPFS_BYTES)
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    yield target
    unmount(target)


def skipped_by_reason(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kvrouter_checkpoint_events_total{") and 'action="skipped"' in line:
            reason = re.search(r'reason="([^"]*)"', line).group(1)
            out[reason] = out.get(reason, 0) + float(line.rsplit(" ", 1)[1])
    return out


def chat(server, i: int, max_tokens: int = 2):
    msgs = [{"role": "system", "content": long_system_prompt(16, project=f"Full{i}")},
            {"role": "user", "content": "Hi."}]
    return openai_client(server).chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                                         max_tokens=max_tokens)


def test_first_open_on_a_full_tmpfs_is_no_crash(tmp_path):
    """The process opening a store for the first time on a full tmpfs gets
    StoreUnavailableError, not SIGBUS (exit status -7)."""
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        mount_tmpfs(target, 2 * 2**20)
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        fill(target)
        code = ("import sys; from kvrouter.cachestore import CheckpointStore, StoreConfig, StoreUnavailableError\n"
                "try: CheckpointStore(StoreConfig(directory=sys.argv[1]))\n"
                "except StoreUnavailableError as exc: print('unavailable', exc.errno)")
        done = subprocess.run([sys.executable, "-c", code, str(target / "kv")], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).parents[2])
    finally:
        unmount(target)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split() == ["unavailable", "28"]


def test_requests_succeed_while_the_disk_fills(start_server, tmpfs):
    server = start_server("--kv-cache-dir", str(tmpfs / "kv"), *STORE_CASE_FLAGS, name="full-disk")
    for i in range(5):  # each wants a ~15 MiB anchor; the disk holds one
        r = chat(server, i)
        assert r.choices[0].message.content is not None
    skipped = skipped_by_reason(server)
    assert skipped.get("disk_full", 0) + skipped.get("write_backoff", 0) >= 3, skipped
    assert "generation failed" not in server.log_path.read_text()
    # what the store holds is still served: the first prompt's anchor is on disk
    again = chat(server, 0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0

    # a restart on the full disk: the worker starts, warns, and serves the store read-only
    fill(tmpfs)
    assert server.stop() == 0
    server.start()
    log = server.log_path.read_text()
    assert "storing nothing" in log or "read-only" in log
    r = chat(server, 0)
    assert r.usage.prompt_tokens_details.cached_tokens > 0  # a disk hit on a full disk
    r = chat(server, 9)  # a cold prompt: its store is skipped, the request succeeds
    assert r.choices[0].message.content is not None
    assert os.path.isdir(tmpfs / "kv" / "index")
