# Device call 2 of the sixth pass: install, build the model, the attention-shape microbenchmark, then the compare
# workload (step trace on): kvrouter defaults, kvrouter --plain-attention-tokens 0, mlx_lm.server.
source /root/gpu/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . gpurun/whl/aiohttp_sse*.whl gpurun/whl/cachetools*.whl || exit 1
[ -f /root/m8b/config.json ] || python3 /root/gpu/mkmodel.py /root/m8b 8b .gpu2/tok || exit 1
[ -n "$MICRO" ] && timeout 120 python3 gpurun/shapes.py /root/m8b
export TMPDIR=/root/bt; mkdir -p $TMPDIR $OUT/logs
B="python3 -P -m kvrouter.router.cli bench --compare --sessions 16 --concurrency 4 --system-words 5000 --max-tokens 16 --model /root/m8b"
run() {
  name=$1; t=$2; shift 2
  KVROUTER_TRACE_STEPS=1 timeout $t $B --output /root/res/$name "$@" 2>&1 | grep -ai "ttft\|error\|Traceback" | tail -5
  cp /root/res/$name/summary.json $OUT/$name-summary.json
  cp /root/bt/kvrouter-bench-*/kvrouter.log $OUT/logs/$name.log 2>/dev/null; rm -rf /root/bt/kvrouter-bench-*
}
for r in $RUNS; do
  case $r in
    kv) run kvrouter 170 --targets kvrouter ;;
    kvoff) run kvrouter-fused 170 --targets kvrouter --server-flags "--plain-attention-tokens 0" ;;
    mlx) run mlx 110 --targets mlx_lm.server ;;
  esac
done
true
