"""What the device microbenchmarks (interfere.py, shapes.py) share."""
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache


def prefill(model, tokens, chunk=2048):
    """A new prompt cache of `model` holding `tokens` (token ids), prefilled `chunk` tokens at a time."""
    caches = make_prompt_cache(model)
    for i in range(0, len(tokens), chunk):
        model(mx.array(tokens[i:i + chunk])[None], cache=caches)
        mx.eval([c.state for c in caches])
    return caches
