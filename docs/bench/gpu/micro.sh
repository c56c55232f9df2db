# Device call 2 of this pass (README "Fourth pass on the H200"; call 1 is `bash .gpu/setup.sh stash`).
# Run from the repository root with these scripts copied into gpurun/ (add /gpurun/ to .git/info/exclude),
# the aiohttp-sse and cachetools wheels in gpurun/whl (`pip download --no-deps -d gpurun/whl aiohttp-sse==3.0
# cachetools==8.0.2`), the tokenizer files in .gpu2/tok; carry [".gpu2", "gpurun"].
source /root/gpu/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . gpurun/whl/*.whl || exit 1
[ -f /root/m8b/config.json ] || python3 /root/gpu/mkmodel.py /root/m8b 8b .gpu2/tok || exit 1
python3 -c "import mlx.core as mx; print(mx.__version__)"
timeout 300 python3 gpurun/interfere.py /root/m8b
