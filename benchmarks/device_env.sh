# Source on a GPU machine whose image lacks mamba-ssm / causal-conv1d (see ../shared/tools/gpu_wheels.sh):
#   source benchmarks/device_env.sh
# installs the carried .whl/ (mamba-ssm, Triton kernels only) and .whl-cc/ (prebuilt causal-conv1d)
# into /tmp/site once, and puts it and this checkout on PYTHONPATH.
if [ ! -d /tmp/site/mamba_ssm ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    if ls .whl-cc/*.part-* >/dev/null 2>&1; then cat .whl-cc/*.part-* | tar xzf - -C /tmp/site; fi
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
