"""Which of mlx-lm's tool parsers fits a chat template, chosen by mlx-lm itself.

The worker reports the choice in `ModelInfo.tool_parser`; the router then loads
that parser module (`router.views.tools`). mlx-lm is imported inside the
function: `kvrouter.worker.models` stays importable without MLX.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

log = logging.getLogger("kvrouter.models")


def tool_parser_for(tokenizer: Any, chat_template: str | None = None, declared: str | None = None) -> str:
    """The mlx-lm tool parser (module `mlx_lm.tool_parsers.<name>`) for a model.

    Args:
        tokenizer: a Hugging Face tokenizer of the model (`chat_template`, `get_vocab()`).
        chat_template: a template that replaces the tokenizer's own (the router's
            --chat-template), or None for the tokenizer's own.
        declared: the parser the model's files name (`tool_parser_type` in
            tokenizer_config.json, as `mlx_lm.load` read it); used when no
            template replaces the model's own.

    Returns:
        The parser's name, or "" when the template has no tool-call syntax mlx-lm knows.
        mlx-lm's rules: `mlx_lm.tokenizer_utils._infer_tool_parser` (markers in the
        template, then tool-call tokens in the vocabulary).
    """
    if declared and not chat_template:
        return declared
    try:
        from mlx_lm.tokenizer_utils import _infer_tool_parser
    except ImportError as exc:  # an mlx-lm without the function: no tool-call parsing
        log.warning("mlx-lm cannot choose a tool parser (%s); tool calls stay text", exc)
        return ""
    if chat_template:
        tokenizer = SimpleNamespace(chat_template=chat_template, get_vocab=tokenizer.get_vocab)
    return _infer_tool_parser(tokenizer) or ""


def declared_tool_parser(tokenizer_wrapper: Any) -> str | None:
    """The parser `mlx_lm.load` chose for a model directory (its `TokenizerWrapper`),
    by name, or None."""
    parse = getattr(tokenizer_wrapper, "tool_parser", None)
    module = getattr(parse, "__module__", "") or ""
    prefix = "mlx_lm.tool_parsers."
    return module[len(prefix):] if module.startswith(prefix) else None
