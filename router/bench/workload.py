"""The benchmark workload: a team's day in small, as pure functions of a seed.

S sessions from U users. Every session's system message is the same shared
system-and-tools block (about `system_words` words); its first user message
starts with an environment block (git status, open files) that is rewritten
every `env_every` sessions, followed by the task; then `turns` turns, each a
scripted assistant reply and a user or tool-result message. Assistant replies
are scripted (replayed, not taken from the server), so every program compared
sees exactly the same prompts and the oracle is known before the run.

Schedule: request (session, turn) becomes ready when (session, turn - 1) is
done; ready requests are taken in (turn, session) order, so all sessions stay
alive at once and each is revisited only after every other session has had a
turn: with more sessions than an in-memory prompt cache holds (mlx_lm.server
keeps 10 entries), its per-session entries are evicted between turns.

Oracle: the fewest tokens any server must prefill for the workload is the
number of distinct token prefixes over all prompts (every prefix computed
once), `distinct_prefixes`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

WORDS = (
    "the build test file module function return value error check config cache token request worker "
    "router store index prefix session model prompt stream client server thread queue state load "
    "write read commit branch merge diff patch status commit log trace metric latency budget policy "
    "anchor waypoint evict restart process memory disk payload checksum header route retry health "
    "python rust shell path option default flag parser schema field type class method argument result "
    "list dict tuple string integer float boolean none true false import package version release "
    "user team agent tool call output input format json yaml line column range offset limit count"
).split()

TOOLS = ("read_file", "write_file", "run_shell", "search_code", "list_dir", "apply_patch", "git_diff", "run_tests")


@dataclass(frozen=True)
class WorkloadSpec:
    """Sizes in words (about 1.2 tokens each with the default tokenizer)."""

    seed: int = 0
    sessions: int = 12
    users: int = 3
    turns: int = 3
    system_words: int = 480
    env_every: int = 4
    env_words: int = 90
    task_words: int = 30
    turn_words: int = 40
    assistant_words: int = 20

    def __post_init__(self) -> None:
        for name in ("sessions", "users", "turns", "system_words", "env_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class BenchRequest:
    """One chat request: the whole conversation so far, ending with a user message."""

    session: int
    turn: int
    user: str
    messages: tuple[dict, ...]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def system_block(spec: WorkloadSpec) -> str:
    """The shared system-and-tools block (the same for every session)."""
    rng = random.Random(f"{spec.seed}:system")
    per_tool = max(1, spec.system_words // (len(TOOLS) + 1))
    lines = ["You are a coding agent working in the team's repository. " + _words(rng, per_tool), "", "Tools:"]
    for tool in TOOLS:
        lines.append(f"- {tool}(path, options): {_words(rng, per_tool)}")
    return "\n".join(lines)


def env_block(spec: WorkloadSpec, version: int) -> str:
    """The environment block of rewrite number `version` (git status and open files)."""
    rng = random.Random(f"{spec.seed}:env:{version}")
    files = [f"src/{rng.choice(WORDS)}_{rng.choice(WORDS)}.py" for _ in range(6)]
    return (f"<env>\ngit status: {len(files)} modified\n" + "\n".join(f" M {f}" for f in files)
            + f"\nnotes: {_words(rng, spec.env_words)}\n</env>")


def make_workload(spec: WorkloadSpec) -> list[list[BenchRequest]]:
    """Every session's requests, turn by turn: result[s][t] is session s at turn t."""
    system = system_block(spec)
    sessions = []
    for s in range(spec.sessions):
        rng = random.Random(f"{spec.seed}:session:{s}")
        user = f"user{s % spec.users}"
        first = f"{env_block(spec, s // spec.env_every)}\n\nTask from {user}: {_words(rng, spec.task_words)}"
        messages: list[dict] = [{"role": "system", "content": system}, {"role": "user", "content": first}]
        requests = [BenchRequest(s, 0, user, tuple(messages))]
        for t in range(1, spec.turns):
            tool = rng.choice(TOOLS)
            messages.append({"role": "assistant", "content": f"Calling {tool}: {_words(rng, spec.assistant_words)}"})
            kind = "Tool result" if rng.random() < 0.6 else "User"
            messages.append({"role": "user", "content": f"{kind}: {_words(rng, spec.turn_words)}"})
            requests.append(BenchRequest(s, t, user, tuple(messages)))
        sessions.append(requests)
    return sessions


def warmup_requests(spec: WorkloadSpec, count: int, round_: int = 0) -> list[BenchRequest]:
    """`count` requests whose text shares nothing with the workload (nor with another
    round's: `round_` seeds them), each a single user message of about
    `spec.system_words` words: sent at once before the measured requests, they make a
    server compile its kernels and grow its buffers for prompts and batches of the
    workload's sizes (a CUDA backend compiles for ~20 s on first use)."""
    out = []
    for i in range(count):
        rng = random.Random(f"{spec.seed}:warmup:{round_}:{i}")
        text = f"Warm-up {round_}.{i}: " + _words(rng, spec.system_words)
        out.append(BenchRequest(-1, 0, "warmup", ({"role": "user", "content": text},)))
    return out


def schedule_order(sessions: list[list[BenchRequest]]) -> list[BenchRequest]:
    """The order requests are issued in with one client at a time: (turn, session).
    With C clients the runner keeps this priority among ready requests."""
    return sorted((r for reqs in sessions for r in reqs), key=lambda r: (r.turn, r.session))


def distinct_prefixes(prompts: Sequence[Sequence[int]]) -> int:
    """The number of distinct non-empty token prefixes over `prompts` (the size of
    their trie): sum of lengths minus the prefixes shared with the lexicographic
    predecessor, over the sorted distinct prompts."""
    ordered = sorted({tuple(p) for p in prompts})
    total = 0
    prev: tuple[int, ...] = ()
    for p in ordered:
        common = 0
        for a, b in zip(prev, p):
            if a != b:
                break
            common += 1
        total += len(p) - common
        prev = p
    return total
