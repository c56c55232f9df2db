"""Deterministic prompts for end-to-end tests."""

from __future__ import annotations


def long_system_prompt(n_rules: int = 40, project: str = "Aurora") -> str:
    """A system prompt of roughly 18 tokens per rule (about 750 tokens for 40 rules),
    shaped like an agent's project context."""
    lines = [f"You are the build assistant of the {project} project. Follow the house rules below."]
    subjects = ["the parser", "the scheduler", "the storage layer", "the network code", "the test suite",
                "the command line", "the documentation", "the release scripts"]
    verbs = ["must be reviewed by two people", "keeps its public names stable", "logs every failure once",
             "never blocks the event loop", "has a benchmark that prints figures"]
    for i in range(n_rules):
        lines.append(f"Rule {i + 1}: {subjects[i % len(subjects)]} {verbs[i % len(verbs)]}, "
                     f"as agreed in meeting {100 + i}.")
    return "\n".join(lines)


def tool_block(n_tools: int = 20) -> str:
    """Tool definitions as an agent's system prompt carries them (~24 tokens each)."""
    lines = ["You can call these tools. Reply with one call per line."]
    for i in range(n_tools):
        lines.append(f"- tool_{i}(path: str, limit: int) -> str: reads part {i} of the workspace, "
                     f"at most `limit` lines, and returns them.")
    return "\n".join(lines)


def env_block(version: int) -> str:
    """An environment block an agent rewrites between sessions (git status)."""
    files = "\n".join(f"  modified: src/module_{version}_{k}.py" for k in range(6))
    return f"Working tree (git status, snapshot {version}):\n{files}"
