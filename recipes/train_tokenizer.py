"""Train a VQ tokenizer (``vq-f4-tiny``) on aimkit's procedural shapes, with HF accelerate.

Launch (the header of ``recipes/configs/tokenizers/vq_f4_tiny.yaml`` has the exact command of the shipped
tokenizer)::

    python recipes/train_tokenizer.py --config recipes/configs/tokenizers/vq_f4_tiny.yaml --out runs/vq_f4_tiny
    python recipes/train_tokenizer.py --config vq_f4_tiny --out /tmp/vq --steps 20 --batch-size 8 --cpu

The loop, top to bottom. Step ``s`` reads items ``[s * B, (s + 1) * B)`` of
``ShapesDataset(steps * B, seed=data_seed)``: every batch is freshly rendered, nothing repeats,
and the run is reproducible from the config. Per step::

    z   = normalize(quant_conv(encoder(x)))          # (B, 8, 16, 16), unit vectors
    k   = argmin_j |z - e_j|                          # nearest normalised codebook row
    z_q = e_k ;  z_st = z + (z_q - z).detach()         # straight-through estimator
    x'  = decoder(post_quant_conv(z_st))
    loss = l1 |x' - x| + l2 |x' - x|^2 + edge |grad x' - grad x|   (reconstruction)
         + codebook |z_q - sg(z)|^2 + commit |z - sg(z_q)|^2     (VQ-VAE, LlamaGen's l2-norm variant)

then one clipped AdamW update (warmup + cosine). Every ``restart_every`` steps, codes no batch
chose since the last check ("dead" codes) are moved onto randomly picked encoder outputs of the
current batch, so that the whole codebook ends up in use; restarts stop after
``restart_until * steps`` so the decoder can settle.

Output folder::

    OUT/tokenizer.safetensors   weights, keys under "tokenizer." (a generator-checkpoint layout):
                                VQTiny().load_weights(...) and aimkit.build(..., pretrained=...) read it
    OUT/tokenizer.json          the resolved config, losses, codebook usage, held-out reconstruction
                                quality (PSNR, shapes-classifier accuracy on reconstructions), wall time
    OUT/metrics.jsonl           one line per log step

The main process holds ``OUT``'s lock (:class:`aimkit._lock.FolderLock`) for the whole run, and a
folder that already holds an earlier run's outputs is refused (there is no resume), so a second
run never truncates the metrics of, or replaces the weights of, another one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aimkit
from aimkit._io import write_text_atomic
from aimkit._lock import lock_on_main_process
from aimkit.config import config_from_dict, config_to_dict, replace_checked
from aimkit.data.shapes import ShapesDataset, make_batch
from aimkit.errors import AimkitError, ConfigError
from aimkit.eval.classifier import HELDOUT_SEED
from aimkit.registry import TOKENIZERS
from aimkit.training import find_config, make_scheduler
from aimkit.weights import save_safetensors_atomic

WEIGHTS_NAME = "tokenizer.safetensors"
RECORD_NAME = "tokenizer.json"
METRICS_NAME = "metrics.jsonl"
KEY_PREFIX = "tokenizer."


@dataclass
class TokenizerRecipe:
    """The keys of a tokenizer config (``recipes/configs/tokenizers/vq_f4_tiny.yaml``)."""

    tokenizer: str = "vq-f4-tiny"  # registered tokenizer name
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # overrides of its config dataclass
    image_size: int = 64  # training resolution
    # --- length and batch
    steps: int = 2000  # optimizer steps
    batch_size: int = 128  # images per step (per process)
    # --- optimizer: AdamW, warmup then cosine decay to min_lr_ratio * lr
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    # --- loss weights
    l1_weight: float = 1.0  # mean |x' - x|
    l2_weight: float = 1.0  # mean (x' - x)^2
    edge_weight: float = 0.5  # mean |finite differences of x' - those of x| (sharp shape edges)
    codebook_weight: float = 1.0  # mean (z_q - sg(z))^2: moves the codebook rows
    commit_weight: float = 0.25  # mean (z - sg(z_q))^2: keeps the encoder near its codes
    # --- dead-code restarts
    restart_every: int = 100  # steps between checks (0: never restart)
    restart_until: float = 0.8  # no restarts after this fraction of the steps
    # --- run
    seed: int = 0  # initialisation and restart picks
    data_seed: int = 1  # image stream (the generator trains on seed 0, evaluation uses others)
    num_workers: int = 4  # data-loader processes rendering images
    mixed_precision: str = "bf16"  # no | bf16 | fp16 (accelerate autocast)
    log_every: int = 100
    eval_images: int = 1000  # held-out images scored after training


def load_recipe(name_or_path: str, overrides: dict[str, Any]) -> TokenizerRecipe:
    """Read a YAML recipe (a path or a name in ``recipes/configs/tokenizers``) and apply ``overrides``."""
    import yaml

    path = find_config(name_or_path, kind="tokenizer")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys to values")
    data.update({k: v for k, v in overrides.items() if v is not None})
    recipe = config_from_dict(TokenizerRecipe, data, where=f"tokenizer recipe {path.name}")
    if recipe.steps <= 0 or recipe.batch_size <= 0:
        raise ConfigError(f"steps and batch_size must be positive, got {recipe.steps}, {recipe.batch_size}")
    if recipe.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {recipe.mixed_precision!r}")
    return recipe


def build_tokenizer(recipe: TokenizerRecipe) -> nn.Module:
    """The registered tokenizer with its default config, changed by ``recipe.tokenizer_config``."""
    cls = TOKENIZERS.get(recipe.tokenizer)
    config = replace_checked(cls.config_cls(), where=f"tokenizer {recipe.tokenizer!r}", **recipe.tokenizer_config)
    return cls(config)


# ============================================================================================
# the training forward
# ============================================================================================


class VQTrainingModel(nn.Module):
    """A VQ tokenizer's training forward: reconstruction through the straight-through estimator.

    Args:
        tok: a :class:`~aimkit.tokenizers.vq.VQModel` (its encoder, quantizer and decoder are used).
        channels_last: run the decoder on NHWC activations (faster convolutions on GPUs).
    """

    def __init__(self, tok: nn.Module, channels_last: bool = False):
        super().__init__()
        self.tok = tok
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> recon (B, 3, H, W), the two VQ losses, codes, latents."""
        tok = self.tok
        z = F.normalize(tok.encode_latents(images).float(), dim=1)  # (B, d, h, w), unit vectors
        b, d, h, w = z.shape
        with torch.no_grad():
            codes = tok.quantize.nearest(z)  # (B, h*w) int64
        z_q = F.embedding(codes, tok.quantize.codebook()).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, d, h, w)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commit_loss = F.mse_loss(z, z_q.detach())
        z_st = (z + (z_q - z).detach()).contiguous(memory_format=self.memory_format)  # straight through
        recon = tok.decoder(tok.post_quant_conv(z_st))  # (B, 3, H, W)
        return {"recon": recon, "codebook": codebook_loss, "commit": commit_loss, "codes": codes,
                "latents": z.detach().permute(0, 2, 3, 1).reshape(-1, d)}


def reconstruction_losses(recon: Tensor, images: Tensor) -> dict[str, Tensor]:
    """L1, L2 and edge (L1 of horizontal/vertical finite differences) terms, float32."""
    recon, images = recon.float(), images.float()
    diff = recon - images
    edge = (diff[..., :, 1:] - diff[..., :, :-1]).abs().mean() + (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean()
    return {"l1": diff.abs().mean(), "l2": diff.pow(2).mean(), "edge": edge}


def usage_stats(counts: Tensor) -> tuple[float, float]:
    """(fraction of codes used, perplexity of the code distribution) from per-code counts."""
    total = counts.sum().clamp_min(1)
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).double().mean().item(), math.exp(entropy.item())


@torch.no_grad()
def restart_dead_codes(tok: nn.Module, counts: Tensor, pool: Tensor, generator: torch.Generator) -> int:
    """Move codes with ``counts == 0`` onto random rows of ``pool`` (N, d); returns how many moved.

    ``pool`` (on the CPU) and ``generator`` must be identical on every process so replicas stay equal."""
    dead = (counts == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    pick = torch.randint(pool.shape[0], (dead.numel(),), generator=generator)
    noise = 0.01 * torch.randn(dead.numel(), pool.shape[1], generator=generator)
    new = F.normalize(pool[pick].float() + noise, dim=-1)  # (n_dead, d) on the CPU
    weight = tok.quantize.embedding.weight
    weight[dead.to(weight.device)] = new.to(device=weight.device, dtype=weight.dtype)
    return dead.numel()


# ============================================================================================
# evaluation
# ============================================================================================


@torch.no_grad()
def evaluate_reconstruction(
    tok: nn.Module, num_images: int, device: torch.device, chunk: int = 250
) -> dict[str, float]:
    """Held-out quality: PSNR, codebook usage, and the shapes classifier's accuracy on the
    reconstructions (an upper bound for what a generator using this tokenizer can reach)."""
    from aimkit.eval.quality import load_default_classifier

    classifier = load_default_classifier(device)
    tok.eval()
    sq_err, n_pix, counts = 0.0, 0, torch.zeros(tok.codebook_size, dtype=torch.long)
    correct_recon = correct_real = 0
    for start in range(0, num_images, chunk):
        n = min(chunk, num_images - start)
        images, labels = make_batch(n, HELDOUT_SEED, start=start)
        images, labels = images.to(device), labels.to(device)
        codes = tok.encode(images)
        recon = tok.decode(codes, clamp=True).float()
        sq_err += (recon - images).pow(2).sum().item()
        n_pix += images.numel()
        counts += torch.bincount(codes.flatten().cpu(), minlength=tok.codebook_size)
        correct_recon += (classifier(recon).argmax(1) == labels).sum().item()
        correct_real += (classifier(images).argmax(1) == labels).sum().item()
    mse = sq_err / n_pix
    used, perplexity = usage_stats(counts)
    return {
        "heldout_seed": HELDOUT_SEED,
        "images": num_images,
        "mse": mse,
        "psnr_db": 10 * math.log10(4.0 / mse),  # peak-to-peak 2 for images in [-1, 1]
        "codebook_used": used,
        "codebook_perplexity": perplexity,
        "classifier_accuracy_reconstructed": correct_recon / num_images,
        "classifier_accuracy_original": correct_real / num_images,
    }


# ============================================================================================
# the run
# ============================================================================================


@dataclass
class _Progress:
    """The training loop's running state between optimizer steps, log lines and restart checks."""

    window_counts: Tensor  # per-code counts since the last restart check
    log_counts: Tensor  # per-code counts since the last log line
    restart_rng: torch.Generator  # identical on every process, so replicas restart the same codes
    metrics_path: Path
    sums: dict[str, Any] = field(default_factory=dict)  # loss terms summed since the last log line
    total_restarted: int = 0
    restarted_since_log: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    last_logged: int = 0
    t_log: float = field(default_factory=time.perf_counter)
    last_record: dict[str, Any] = field(default_factory=dict)


def _build_training_model(recipe: TokenizerRecipe, device: torch.device):
    """(tokenizer, training wrapper, optimizer, scheduler), channels-last on CUDA."""
    tok = build_tokenizer(recipe)
    if tok.config.image_size != recipe.image_size:
        raise ConfigError(f"image_size {recipe.image_size} != the tokenizer's {tok.config.image_size}")
    channels_last = device.type == "cuda"
    if channels_last:
        tok.channels_last()
    model = VQTrainingModel(tok, channels_last=channels_last).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
    )
    scheduler = make_scheduler(optimizer, total=recipe.steps, warmup=recipe.warmup_steps, schedule="cosine",
                               min_ratio=recipe.min_lr_ratio)
    return tok, model, optimizer, scheduler


def _make_loader(recipe: TokenizerRecipe, world: int, device: torch.device) -> torch.utils.data.DataLoader:
    """An endless-looking stream of freshly rendered images, one pass of ``recipe.steps`` batches."""
    dataset = ShapesDataset(recipe.steps * recipe.batch_size * world, seed=recipe.data_seed,
                            image_size=recipe.image_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=recipe.batch_size, shuffle=False, drop_last=True,
        num_workers=recipe.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if recipe.num_workers else None,
    )


def _optimizer_step(accelerator, model, optimizer, scheduler, recipe: TokenizerRecipe, images: Tensor):
    """One forward/backward/update; returns (model outputs, loss terms, gradient norm)."""
    with accelerator.autocast():
        result = model(images)
    rec = reconstruction_losses(result["recon"], images)
    loss = (recipe.l1_weight * rec["l1"] + recipe.l2_weight * rec["l2"] + recipe.edge_weight * rec["edge"]
            + recipe.codebook_weight * result["codebook"] + recipe.commit_weight * result["commit"])
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    terms = {"loss": loss, **rec, "codebook": result["codebook"], "commit": result["commit"]}
    return result, terms, grad_norm


def _accumulate(progress: _Progress, result: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
    """Add one step's code counts and loss terms (no host sync)."""
    codes_count = torch.bincount(result["codes"].flatten(), minlength=progress.window_counts.numel())
    progress.window_counts += codes_count
    progress.log_counts += codes_count
    for k, v in terms.items():
        progress.sums[k] = progress.sums.get(k, 0.0) + v.detach()


def _restart_check(accelerator, model, recipe: TokenizerRecipe, progress: _Progress, result: dict[str, Tensor]):
    """Move the codes unused since the last check onto current latents (until ``restart_until``)."""
    counts = accelerator.reduce(progress.window_counts, reduction="sum")
    if progress.step <= recipe.restart_until * recipe.steps:
        latents = result["latents"]  # (B*h*w, d)
        sample = latents[torch.randperm(latents.shape[0], device=latents.device)[:1024]]
        pool = accelerator.gather(sample).cpu()
        moved = restart_dead_codes(accelerator.unwrap_model(model).tok, counts, pool, progress.restart_rng)
        progress.total_restarted += moved
        progress.restarted_since_log += moved
    progress.window_counts.zero_()


def _log_progress(accelerator, recipe: TokenizerRecipe, scheduler, grad_norm, progress: _Progress) -> None:
    """Reduce the sums since the last log line, append them to metrics.jsonl and print them."""
    step = progress.step
    n_steps = step - progress.last_logged
    means = {k: accelerator.reduce(v, reduction="mean").item() / n_steps for k, v in progress.sums.items()}
    used, perplexity = usage_stats(accelerator.reduce(progress.log_counts, reduction="sum").cpu())
    elapsed = time.perf_counter() - progress.t_log
    record = {
        "step": step, **{k: round(v, 6) for k, v in means.items()},
        "codebook_used": round(used, 4), "perplexity": round(perplexity, 1),
        "restarted": progress.restarted_since_log, "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "images_per_s": n_steps * recipe.batch_size * accelerator.num_processes / elapsed,
    }
    progress.last_record = record
    progress.history.append(record)
    if accelerator.is_main_process:
        with open(progress.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.print(
        f"step {step:>6d} | loss {means['loss']:.4f} (l1 {means['l1']:.4f} l2 {means['l2']:.4f} "
        f"edge {means['edge']:.4f} cb {means['codebook']:.4f} commit {means['commit']:.4f}) | "
        f"codes used {used:6.1%} ppl {perplexity:6.1f} restarted {progress.restarted_since_log:4d} | "
        f"{record['images_per_s']:,.0f} img/s", flush=True)
    progress.sums, progress.restarted_since_log, progress.last_logged = {}, 0, step
    progress.t_log = time.perf_counter()
    progress.log_counts.zero_()


def _train_loop(accelerator, model, optimizer, scheduler, loader, recipe: TokenizerRecipe, codebook_size: int,
                out: Path) -> _Progress:
    """Run every batch of ``loader``; returns the final loop state (``step`` = steps taken)."""
    device = accelerator.device
    progress = _Progress(
        window_counts=torch.zeros(codebook_size, dtype=torch.long, device=device),
        log_counts=torch.zeros(codebook_size, dtype=torch.long, device=device),
        restart_rng=torch.Generator().manual_seed(recipe.seed + 1),
        metrics_path=out / METRICS_NAME,
    )
    if accelerator.is_main_process:
        write_text_atomic(progress.metrics_path, "")  # the folder held no earlier run (check_fresh_output)
    for images, _labels in loader:
        result, terms, grad_norm = _optimizer_step(accelerator, model, optimizer, scheduler, recipe, images)
        progress.step += 1
        _accumulate(progress, result, terms)
        if recipe.restart_every and progress.step % recipe.restart_every == 0:
            _restart_check(accelerator, model, recipe, progress, result)
        if progress.step % recipe.log_every == 0 or progress.step == 1 or progress.step == recipe.steps:
            _log_progress(accelerator, recipe, scheduler, grad_norm, progress)
    return progress


def _save_and_evaluate(accelerator, model, recipe: TokenizerRecipe, out: Path, progress: _Progress,
                       n_params: int, train_seconds: float) -> dict[str, Any]:
    """Save the weights, read them back strictly, evaluate the reloaded tokenizer and write the
    record (main process; the others return ``{}``)."""
    device, world = accelerator.device, accelerator.num_processes
    trained = accelerator.unwrap_model(model).tok
    state = {KEY_PREFIX + k: v.detach().float().cpu() for k, v in trained.state_dict().items()}
    path = save_safetensors_atomic(
        state, out / WEIGHTS_NAME,
        metadata={"format": "aimkit", "tokenizer": recipe.tokenizer,
                  "config": json.dumps(config_to_dict(trained.config))},
    )
    reloaded = type(trained)(trained.config).load_weights(path).to(device)
    quality = evaluate_reconstruction(reloaded, recipe.eval_images, device)
    accelerator.print(
        f"held-out: PSNR {quality['psnr_db']:.2f} dB | codes used {quality['codebook_used']:.1%} "
        f"(ppl {quality['codebook_perplexity']:.1f}) | classifier accuracy on reconstructions "
        f"{quality['classifier_accuracy_reconstructed']:.4f} (originals "
        f"{quality['classifier_accuracy_original']:.4f})", flush=True)
    record = {
        "file": WEIGHTS_NAME,
        "tokenizer": recipe.tokenizer,
        "tokenizer_config": config_to_dict(trained.config),
        "num_parameters": n_params,
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(recipe).items()},
        "steps": progress.step,
        "images_seen": progress.step * recipe.batch_size * world,
        "codes_restarted": progress.total_restarted,
        "final_log": progress.last_record,
        "heldout": quality,
        "train_wall_time_s": round(train_seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "num_processes": world,
        "torch_version": torch.__version__,
        "aimkit_version": aimkit.__version__,
    }
    write_text_atomic(out / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    accelerator.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {out / RECORD_NAME}", flush=True)
    return record


def check_fresh_output(out: Path) -> None:
    """Refuse ``out`` when it holds an earlier run's weights, record or metric lines: this run would
    replace them (its metrics from the first step on), and there is no resume to continue them."""
    paths = [out / name for name in (WEIGHTS_NAME, RECORD_NAME, METRICS_NAME)]
    earlier = [p.name for p in paths if p.exists() and not (p.is_file() and p.stat().st_size == 0)]
    if earlier:
        raise ConfigError(
            f"{out} already holds {', '.join(earlier)} of an earlier run; choose another --out, "
            "or move those files away to train again"
        )


def train(recipe: TokenizerRecipe, out: Path, cpu: bool = False) -> dict[str, Any]:
    """Train, evaluate, save; returns the record written to ``OUT/tokenizer.json``.

    Raises:
        ConfigError: ``out`` holds an earlier run's outputs (:func:`check_fresh_output`).
        FolderBusyError: another run holds ``out``. Neither error changes anything in ``out``.
    """
    from accelerate import Accelerator

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    accelerator = Accelerator(cpu=cpu, mixed_precision=recipe.mixed_precision)
    lock = lock_on_main_process(accelerator, out, "train_tokenizer")  # first, so the check below is not raced
    try:
        check_fresh_output(out)  # every process sees the same files: all go on, or all stop here
        accelerator.wait_for_everyone()  # nothing is written before every process has checked
        return _train(accelerator, recipe, out)
    finally:
        if lock is not None:
            lock.release()


def _train(accelerator, recipe: TokenizerRecipe, out: Path) -> dict[str, Any]:
    """:func:`train` in a folder this run holds."""
    from accelerate.utils import set_seed

    start_time = time.perf_counter()
    device, main = accelerator.device, accelerator.is_main_process
    torch.backends.cudnn.benchmark = True

    set_seed(recipe.seed)
    tok, model, optimizer, scheduler = _build_training_model(recipe, device)
    world = accelerator.num_processes
    loader = _make_loader(recipe, world, device)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    n_params = sum(p.numel() for p in tok.parameters())
    accelerator.print(
        f"{recipe.tokenizer}: {n_params:,} params | {world} process(es) x batch {recipe.batch_size} | "
        f"{recipe.steps} steps | lr {recipe.lr:.2e} | {recipe.mixed_precision} | {device}", flush=True)

    progress = _train_loop(accelerator, model, optimizer, scheduler, loader, recipe, tok.codebook_size, out)
    train_seconds = time.perf_counter() - start_time
    if progress.step != recipe.steps:
        raise RuntimeError(f"the data ran out after {progress.step} of {recipe.steps} steps")

    accelerator.wait_for_everyone()
    record: dict[str, Any] = {}
    if main:
        record = _save_and_evaluate(accelerator, model, recipe, out, progress, n_params, train_seconds)
    accelerator.wait_for_everyone()
    return record


def parse_args(argv: list | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vq_f4_tiny",
                        help="YAML recipe: a path or a name in recipes/configs/tokenizers")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--steps", type=int, help="optimizer steps (overrides the config)")
    parser.add_argument("--batch-size", type=int, help="images per step and process (overrides the config)")
    parser.add_argument("--num-workers", type=int, help="data-loader processes (overrides the config)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="overrides the config")
    parser.add_argument("--eval-images", type=int, help="held-out images scored at the end (overrides the config)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.config, {
            "steps": args.steps, "batch_size": args.batch_size, "num_workers": args.num_workers,
            "mixed_precision": args.mixed_precision, "eval_images": args.eval_images,
        })
        train(recipe, args.out, cpu=args.cpu)
    except AimkitError as exc:
        print(f"train_tokenizer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
