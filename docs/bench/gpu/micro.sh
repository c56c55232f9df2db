source /root/gpu/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . gpurun/whl/*.whl || exit 1
[ -f /root/m8b/config.json ] || python3 /root/gpu/mkmodel.py /root/m8b 8b .gpu2/tok || exit 1
python3 -c "import mlx.core as mx; print(mx.__version__)"
timeout 300 python3 gpurun/interfere.py /root/m8b
