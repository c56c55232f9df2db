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
