"""GPU microbenchmark: does a checkpoint writer's host read of MLX arrays slow the engine's
forwards, and does a state that was read on the host (or built from host bytes) cost more
to use on the GPU afterwards? Prints and saves JSON."""
import json, os, sys, threading, time
import mlx.core as mx
import numpy as np
from mlx_lm import load
from gpu_common import prefill
from kvrouter.worker import cache_state

out = {}
model, _ = load(sys.argv[1])
N, SUF = int(os.environ.get("NTOK", 5400)), 40
rng = np.random.default_rng(0)
prompt = rng.integers(100, 20000, N + SUF).tolist()

base = prefill(model, prompt[:N])
def hit(src, n_suffix=SUF, first_token=True):
    t0 = time.perf_counter()
    c = cache_state.cut(src, N, N)
    logits = model(mx.array(prompt[N:N + n_suffix])[None], cache=c)
    if first_token:
        tok = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(tok, [x.state for x in c])
    else:
        mx.eval([x.state for x in c])
    return time.perf_counter() - t0

def timed(label, f, reps=8):
    xs = [f() for _ in range(reps)]
    out[label] = [round(x * 1000, 2) for x in xs]
    print(label, "ms", out[label], flush=True)

for _ in range(3): hit(base)
timed("hit_baseline", lambda: hit(base))
timed("suffix1_baseline", lambda: hit(base, 1))

def host_read(caches, path=os.environ.get("WPATH", "/root/w.bin")):
    cache_state.payload_writer(caches, N, "m", None)(path)

# writer thread: fresh snapshots (cut + eval on its own thread, as prepare() then the writer do), host-read
stop = threading.Event(); wrote = [0, 0.0]
def writer():
    while not stop.is_set():
        snap = cache_state.cut(base, N, N); mx.eval([c.state for c in snap])
        t = time.perf_counter(); host_read(snap); wrote[0] += 1; wrote[1] += time.perf_counter() - t
th = threading.Thread(target=writer); th.start(); time.sleep(0.5)
timed("hit_while_writer_reads", lambda: hit(base))
stop.set(); th.join()
out["writer_snapshot_read_s_avg"] = round(wrote[1] / max(1, wrote[0]), 3); print("writer avg read s", out["writer_snapshot_read_s_avg"])

# a state read on the host once, then used on the GPU (RAM tier keeps written snapshots)
snap = cache_state.cut(base, N, N); mx.eval([c.state for c in snap])
t = time.perf_counter(); host_read(snap); out["host_read_once_s"] = round(time.perf_counter() - t, 3)
timed("hit_from_host_read_state", lambda: hit(snap), reps=4)

# a state built from host bytes (as a load from disk does)
from mlx_lm.models.cache import load_prompt_cache
wp = os.environ.get("WPATH", "/root/w.bin") + ".safetensors"
cache_state.payload_writer(base, N, "m", None)(wp)
t = time.perf_counter(); built = load_prompt_cache(wp); mx.eval([c.state for c in built]); out["build_from_host_s"] = round(time.perf_counter() - t, 3)
timed("hit_from_host_built_state", lambda: hit(built), reps=4)

# buffer turnover under a small MLX cache limit (the worker's plan sets 2 GiB on the GPU):
# four 0.7 GB states freed before each hit
def turnover_hit():
    snaps = [cache_state.cut(base, N, N) for _ in range(4)]
    mx.eval([c.state for s in snaps for c in s])
    del snaps
    return hit(base)
timed("hit_after_turnover_default_limit", turnover_hit, reps=5)
old = mx.set_cache_limit(2 * 2**30)
timed("hit_after_turnover_2gib_limit", turnover_hit, reps=5)
def turnover_cost():
    snaps = [cache_state.cut(base, N, N) for _ in range(4)]
    mx.eval([c.state for s in snaps for c in s])
    t = time.perf_counter(); del snaps; mx.eval(mx.zeros(1)); return time.perf_counter() - t
timed("free_4_states_2gib_limit", turnover_cost, reps=5)
mx.set_cache_limit(old)
timed("free_4_states_default_limit", turnover_cost, reps=5)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "interfere.json"), "w"), indent=1)
