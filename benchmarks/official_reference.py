"""The official AiM code's timings from this device call, as reference figures for ``aimkit bench``.

``../shared/tools/bench_official.py`` (sampling, tokens only, plus the VQ decode of the batch) and
``bench_official_train.py`` (the eager training step) each write a JSON list of rows. This script
turns them into the file ``aimkit bench --reference`` reads (:func:`aimkit.bench.load_reference`), so that
the harness's report sets the official rows, measured in the same call, beside aimkit's, with ratios::

    python3 .ab_old/bench_official.py .ab_old/official_aim $OUT/official_sampling.json AiM-B:256 ...
    python3 .ab_old/bench_official_train.py .ab_old/official_aim $OUT/official_train.json AiM-B:64 AiM-L:64
    python3 benchmarks/official_reference.py $OUT/official_sampling.json $OUT/official_train.json $OUT/official.json
    python3 benchmarks/run_all.py --reference $OUT/official.json

Either input may be missing (a part that did not finish): its section is then left out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

TOKENS = 256  # the official benches sample and train 16 x 16 code grids


def _rows(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        print(f"official_reference: {path} is missing; its section is left out", file=sys.stderr)
        return []
    return json.loads(p.read_text())


def reference(sampling_rows: list[dict], train_rows: list[dict], device: str, date: str,
              where: str = "in this device call") -> dict:
    """The reference document: ``sampling`` (and ``training``) entries named as aimkit's presets;
    ``where`` says when they were measured relative to the run they stand beside."""
    source = f"measured {where} (bench_official.py)"
    sampling = [{"model": r["model"].lower(), "batch": r["batch"], "tokens": TOKENS, "dtype": "bfloat16",
                 "images_per_s": round(r["img_s"], 2), "seconds_per_batch": r["s_per_batch"],
                 "first_call_s": r.get("first_call_s"), "vq_decode_s": r.get("vq_decode_s"),
                 "device": device, "source": source, "date": date} for r in sampling_rows]
    training = [{"model": r["model"].lower(), "batch": r["batch"], "tokens": TOKENS, "tokens_per_s": r["tok_s"],
                 "step_s": r["step_s"], "device": device, "date": date,
                 "source": f"measured {where} (bench_official_train.py, eager)"} for r in train_rows]
    return {"description": f"The official AiM code (hp-l33/AiM) timed {where}: "
                           "sample_cfg with CUDA-graph decoding (fast=True), bf16, random weights, guidance on, "
                           "tokens only (the VQ decode of the batch timed apart), median of 3; its eager training "
                           "step (bf16 autocast, fused AdamW, grad clip 1.0), mean of 10 after 3 warm-up steps.",
            "sampling": sampling, "training": training}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sampling_json")
    ap.add_argument("train_json")
    ap.add_argument("out_json")
    ap.add_argument("--device", default="NVIDIA H200")
    ap.add_argument("--where", default="in this device call",
                    help="when the rows were measured, relative to the run (e.g. 'in the call before, same lease')")
    args = ap.parse_args(argv)
    date = _dt.date.today().isoformat()
    doc = reference(_rows(args.sampling_json), _rows(args.train_json), args.device, date, args.where)
    Path(args.out_json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out_json}: {len(doc['sampling'])} sampling, {len(doc['training'])} training entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
