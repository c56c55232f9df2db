# Device call 2 of this pass (README "Fourth pass on the H200"; call 1 is `bash .gpu/setup.sh stash`).
# Run from the repository root with these scripts copied into gpurun/ (add /gpurun/ to .git/info/exclude),
# the aiohttp-sse and cachetools wheels in gpurun/whl (`pip download --no-deps -d gpurun/whl aiohttp-sse==3.0
# cachetools==8.0.2`), the tokenizer files in .gpu2/tok; carry [".gpu2", "gpurun"].
# call 2: install, build the model, kvrouter compare with the step trace, then mlx_lm.server
source /root/gpu/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . gpurun/whl/*.whl || exit 1
[ -f /root/m8b/config.json ] || python3 /root/gpu/mkmodel.py /root/m8b 8b .gpu2/tok || exit 1
export TMPDIR=/root/bt; mkdir -p $TMPDIR
T=${TARGETS:-kvrouter mlx_lm.server}
for t in $T; do
  KVROUTER_TRACE_STEPS=1 timeout 400 python3 -P -m kvrouter.router.cli bench --compare --targets $t --sessions 16 --concurrency 4 \
     --system-words 5000 --max-tokens 16 --model /root/m8b --output $OUT/$t 2>&1 | tail -15
done
mkdir -p $OUT/logs; for d in /root/bt/kvrouter-bench-*; do cp $d/*.log $OUT/logs/ 2>/dev/null; done; ls -la $OUT/logs
