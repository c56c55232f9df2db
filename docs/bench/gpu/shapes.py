"""GPU microbenchmark: does a prefill chunk of a new (chunk, cache) shape cost more than a repeated one
(cuDNN builds an attention graph per shape), and does plain attention (worker.cuda_attention) avoid it?
Prints and saves $OUT/shapes.json."""
import json, os, sys, time
import mlx.core as mx
import numpy as np
from mlx_lm import load
from gpu_common import prefill
from kvrouter.worker import cache_state, cuda_attention

out = {}
model, _ = load(sys.argv[1])
N = 5400
rng = np.random.default_rng(0)
prompt = rng.integers(100, 20000, N + 800).tolist()

base = prefill(model, prompt[:N])

def hit(n_prefix, n_suffix):
    mx.synchronize(); t0 = time.perf_counter()
    c = cache_state.cut(base, N, n_prefix)
    logits = model(mx.array(prompt[n_prefix:n_prefix + n_suffix])[None], cache=c)
    tok = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(tok, [x.state for x in c])
    return round((time.perf_counter() - t0) * 1000, 2), logits[0, -1]

def series(label, pairs):
    xs = [hit(p, s)[0] for p, s in pairs]
    out[label] = xs
    print(label, xs, flush=True)

for _ in range(3): hit(N, 40)
series("fused_same_160", [(N, 160)] * 6)
series("fused_new_suffix", [(N, 150 + i) for i in range(8)])
series("fused_new_prefix", [(N - 1 - 7 * i, 160) for i in range(8)])
series("fused_new_suffix_again", [(N, 150 + i) for i in range(8)])
# sdpa alone, new shapes
def sdpa_t(L, S=5600, f=mx.fast.scaled_dot_product_attention):
    q = mx.random.normal((1, 32, L, 128)).astype(mx.bfloat16)
    k = mx.random.normal((1, 8, S, 128)).astype(mx.bfloat16); v = mx.random.normal((1, 8, S, 128)).astype(mx.bfloat16)
    mx.eval(q, k, v); mx.synchronize(); t0 = time.perf_counter()
    mx.eval(f(q, k, v, scale=0.088, mask="causal")); return round((time.perf_counter() - t0) * 1000, 2)
out["sdpa_fused_new"] = [sdpa_t(300 + i) for i in range(6)]
out["sdpa_fused_same"] = [sdpa_t(300) for _ in range(4)]
print("sdpa fused new", out["sdpa_fused_new"], "same", out["sdpa_fused_same"], flush=True)
ref = hit(N, 333)[1]
cuda_attention.install(512)
got = hit(N, 333)[1]
out["max_abs_logit_diff_plain_vs_fused"] = float(mx.abs(ref.astype(mx.float32) - got.astype(mx.float32)).max())
out["argmax_equal"] = bool(mx.argmax(ref).item() == mx.argmax(got).item())
print("plain vs fused logits", out["max_abs_logit_diff_plain_vs_fused"], out["argmax_equal"], flush=True)
series("plain_same_160", [(N, 160)] * 6)
series("plain_new_suffix", [(N, 170 + i) for i in range(8)])
series("plain_new_prefix", [(N - 2 - 7 * i, 170) for i in range(8)])
series("plain_512", [(N, 500 + i) for i in range(4)])
out["sdpa_plain_new"] = [sdpa_t(310 + i, f=cuda_attention.short_query_attention) for i in range(6)]
print("sdpa plain new", out["sdpa_plain_new"], flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "shapes.json"), "w"), indent=1)
