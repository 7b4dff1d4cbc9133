"""The whole ``docs/benchmarks.md`` table in one command on a GPU machine.

Runs ``aimkit bench`` with the defaults below (any ``aimkit bench`` option given on the command
line replaces its default): device ceilings, the correctness check, AiM-B/L/XL sampling at batch
16/64/256 with 256 tokens (tokens only, plus the VQ decoding of each batch), Mamba2 vs a
transformer of matching size at batch 64 over 256/576/1024 tokens (AiM-B size), the decode-step
replay of AiM-XL at batch 16 and 256, and the training step of AiM-B and AiM-L (eager, each
sublayer replayed from CUDA graphs as with several processes, and wholly captured). bf16 weights
and the default execution policy (bf16 SSM state, as the official code keeps it; ``--policy
state_dtype=float32`` for a float32 state). The official AiM code's measured figures
(``docs/data/official_reference.json``) are drawn beside the results. It stops starting rows
after ``--budget-s`` (default 480 s) so that the outputs are written inside the device's
10-minute limit.

On the device machine (mamba-ssm's Triton-only wheel in ``.whl``, causal-conv1d in ``.whl-cc``;
see ``shared/tools/gpu_wheels.sh``), carrying ``[".whl", ".whl-cc"]``::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && cat .whl-cc/*.part-* | tar xzf - -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD \
      && PYTHONUNBUFFERED=1 python3 benchmarks/run_all.py

(timeout_s 600). Validated on one H200 on 2026-11-22 with a reduced grid (aim-b only): 156 s, of
which 48 s are the first Triton compiles (correctness row) and 75 s the first training step
(backward-kernel autotuning). The full default grid is expected to take 6-7 minutes on an H100;
``--repeats 2`` saves about a minute.

Outputs go to ``$OUT`` (``bench.json``, ``bench.md``, ``bench.log`` and three PNGs: 6 files).
It exits 3 without timing anything when the Mamba2 kernels cannot be imported on CUDA
(``--no-require-kernels`` to measure the PyTorch path anyway) and 1 when the correctness check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

from aimkit.commands import bench as bench_command  # noqa: E402

DEFAULTS = dict(
    suite="all",
    models=["aim-b", "aim-l", "aim-xl"],
    batches=[16, 64, 256],
    tokens=[256],
    compare_models=["aim-b"],
    compare_batches=(64,),
    compare_tokens=[256, 576, 1024],
    decode_models=["aim-xl"],
    decode_batches=[16, 256],
    train_models=["aim-b", "aim-l"],
    repeats=2,
    budget_s=480.0,
    require_kernels=True,
    decode_vq=True,  # end-to-end rows: VQ decoding of every sampled batch too
    check_model="aim-b",
    reference=str(ROOT / "docs" / "data" / "official_reference.json"),
)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_command.add_arguments(parser)
    parser.add_argument("--no-require-kernels", dest="require_kernels", action="store_false",
                        help="time the PyTorch path when mamba-ssm is missing instead of stopping")
    parser.set_defaults(**DEFAULTS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from aimkit.errors import AimkitError

    try:
        return bench_command.run(args)
    except AimkitError as exc:
        print(f"run_all: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
