"""Model loading for kvrouter workers: GGUF and mlx-lm models, their tokenizers and identity.

Public API: ``ModelBundle``, ``load_model``, ``default_model_path``, ``build_hf_tokenizer``,
``ModelNotFoundError``, ``model_identity``, ``CHECKPOINT_FORMAT``.

MLX is imported only when ``ModelBundle`` or ``load_model`` is first used, so the router
can import ``build_hf_tokenizer`` from here without pulling in MLX.
"""

from typing import TYPE_CHECKING, Any

from .identity import CHECKPOINT_FORMAT, model_identity
from .resolve import ModelNotFoundError, default_model_path
from .tokenizer import build_hf_tokenizer

if TYPE_CHECKING:
    from .loader import ModelBundle, load_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "ModelBundle",
    "ModelNotFoundError",
    "build_hf_tokenizer",
    "default_model_path",
    "load_model",
    "model_identity",
]

_MLX_NAMES = {"ModelBundle", "load_model"}


def __getattr__(name: str) -> Any:
    if name in _MLX_NAMES:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
