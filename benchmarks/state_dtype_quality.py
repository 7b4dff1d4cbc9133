"""Evidence for the default SSM state dtype: bf16 state against float32 state, same model, same seeds.

    python benchmarks/state_dtype_quality.py --num 1008 --out docs/data/state_dtype_quality.json

Two measurements, both on the PyTorch reference path (the GPU kernels store the state in the same
dtype and compute the update in float32, as the reference does):

1. aim-tiny-shapes (the shipped trained weights) in bfloat16, sampled with ``state_dtype`` float32
   and ``model`` (bf16) from the same seed: conditional accuracy and Fréchet distance in the
   shapes classifier's feature space (``aimkit.eval.quality``), and the fraction of images whose
   tokens are identical.
2. Random AiM-L (350M) in bfloat16: teacher-forced decoding of 256 tokens with each state dtype;
   the per-step relative logit difference against the float32-state run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import aimkit  # noqa: E402
from aimkit.eval.quality import evaluate_generated  # noqa: E402


def shapes_quality(num: int, seed: int, batch: int) -> dict:
    """Accuracy / Fréchet distance of aim-tiny-shapes in bf16 with each state dtype (same seed)."""
    out, tokens = {}, {}
    labels = torch.arange(num) % 36
    for state in ("float32", "model"):
        gen = aimkit.build("aim-tiny-shapes", dtype=torch.bfloat16, policy={"state_dtype": state})
        start = time.perf_counter()
        codes = gen.generate(labels, seed=seed, batch_size=batch, output="tokens", progress=False)
        images = _decode(gen, codes)
        report = evaluate_generated(images, labels)
        tokens[state] = codes
        out[state] = {"accuracy": report.conditional_accuracy, "frechet": report.frechet_distance,
                      "seconds": time.perf_counter() - start}
        print(state, out[state], flush=True)
    same = (tokens["float32"] == tokens["model"]).all(dim=1).float().mean().item()
    out["identical_images_fraction"] = same
    out["identical_tokens_fraction"] = (tokens["float32"] == tokens["model"]).float().mean().item()
    return out


def _decode(gen, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([gen.tokenizer.decode(c).float().clamp(-1, 1) for c in codes.split(64)])


def logit_drift(name: str, seed: int, batch: int) -> dict:
    """Per-step relative L2 difference of bf16-state logits against float32-state logits, decoding
    the same teacher-forced tokens through the cache (random weights, bf16 parameters)."""
    torch.manual_seed(seed)
    gen = aimkit.build(name, dtype=torch.bfloat16, tokenizer=None, pretrained=False)
    codes = torch.randint(gen.vocab_size, (batch, gen.num_tokens), generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(batch) % gen.num_classes
    runs = {}
    for state in ("float32", "model"):
        gen.set_policy(gen.policy.replace(state_dtype=state))
        with torch.inference_mode():
            cond = gen.condition(labels)
            params = gen.allocate_inference_cache(batch)
            logits = [gen.prefill(cond, params).float()]
            params.advance(1)
            for k in range(gen.num_tokens - 1):
                logits.append(gen.decode_step(codes[:, k], cond, params).float())
                params.advance(1)
        runs[state] = torch.stack(logits, 1)  # (B, N, V)
    ref, low = runs["float32"], runs["model"]
    rel = ((low - ref).norm(dim=-1) / ref.norm(dim=-1)).mean(0)  # (N,)
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"model": name, "batch": batch, "steps": int(rel.numel()), "rel_diff_first": rel[0].item(),
            "rel_diff_mean": rel.mean().item(), "rel_diff_max": rel.max().item(), "rel_diff_last": rel[-1].item(),
            "rel_diff_by_64_steps": [rel[i:i + 64].mean().item() for i in range(0, rel.numel(), 64)],
            "argmax_agreement": agree}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1008, help="images per state dtype (default 1008)")
    parser.add_argument("--batch", type=int, default=144)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drift-model", default="aim-l")
    parser.add_argument("--drift-batch", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"torch": torch.__version__, "device": "cpu", "date": time.strftime("%Y-%m-%d"),
              "shapes": shapes_quality(args.num, args.seed, args.batch),
              "drift": logit_drift(args.drift_model, args.seed, args.drift_batch)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
