# Device call 2 of this pass (README "Fourth pass on the H200"; call 1 is `bash .gpu/setup.sh stash`).
# Run from the repository root with these scripts copied into gpurun/ (add /gpurun/ to .git/info/exclude),
# the aiohttp-sse and cachetools wheels in gpurun/whl (`pip download --no-deps -d gpurun/whl aiohttp-sse==3.0
# cachetools==8.0.2`), the tokenizer files in .gpu2/tok; carry [".gpu2", "gpurun"].
# call 2: install, build the model; kvrouter (defaults), mlx_lm.server, kvrouter with a large MLX buffer cache
source /root/gpu/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . gpurun/whl/*.whl || exit 1
[ -f /root/m8b/config.json ] || python3 /root/gpu/mkmodel.py /root/m8b 8b .gpu2/tok || exit 1
export TMPDIR=/root/bt; mkdir -p $TMPDIR $OUT/logs
B="python3 -P -m kvrouter.router.cli bench --compare --sessions 16 --concurrency 4 --system-words 5000 --max-tokens 16 --model /root/m8b"
KVROUTER_TRACE_STEPS=1 timeout 240 $B --targets kvrouter --output $OUT/kvrouter 2>&1 | grep ttft
cp /root/bt/kvrouter-bench-*/kvrouter.log $OUT/logs/kvrouter.log; rm -rf /root/bt/kvrouter-bench-*
timeout 160 $B --targets mlx_lm.server --output $OUT/mlx_lm.server 2>&1 | grep ttft
rm -rf /root/bt/kvrouter-bench-*
KVROUTER_TRACE_STEPS=1 timeout 180 $B --targets kvrouter --server-flags '--mlx-cache-limit-mb 20000' --output $OUT/kvrouter-cache20g 2>&1 | grep ttft
cp /root/bt/kvrouter-bench-*/kvrouter.log $OUT/logs/kvrouter-cache20g.log
