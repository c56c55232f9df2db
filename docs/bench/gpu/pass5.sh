# Device call 2 of the fifth pass: install, build the model, then the compare workload with the step trace
# (KVROUTER_TRACE_STEPS=1), kvrouter defaults and kvrouter --no-kv-cache; per-request summaries and worker logs saved.
source /root/gpu/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . gpurun/whl/aiohttp_sse*.whl gpurun/whl/cachetools*.whl || exit 1
[ -f /root/m8b/config.json ] || python3 /root/gpu/mkmodel.py /root/m8b 8b .gpu2/tok || exit 1
export TMPDIR=/root/bt; mkdir -p $TMPDIR $OUT/logs /root/out
B="python3 -P -m kvrouter.router.cli bench --compare --sessions 16 --concurrency 4 --system-words 5000 --max-tokens 16 --model /root/m8b"
run() {
  name=$1; t=$2; shift 2
  KVROUTER_TRACE_STEPS=1 timeout $t $B --output /root/out/$name "$@" 2>&1 | grep -ai "ttft\|error\|Traceback" | tail -5
  for f in $(find /root/out/$name -name 'summary.json'); do cp $f $OUT/$name-summary.json; done
  cp /root/bt/kvrouter-bench-*/kvrouter.log $OUT/logs/$name.log 2>/dev/null; rm -rf /root/bt/kvrouter-bench-*
}
run kvrouter ${T1:-220} --targets kvrouter
[ -n "$SECOND" ] && run $SECOND ${T2:-200} --targets $SECOND_TARGET $SECOND_FLAGS
true
