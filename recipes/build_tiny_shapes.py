"""Build aimkit's embedded ``aim-tiny-shapes`` model from nothing, with one command.

On one GPU (H100 / H200; about 5 minutes, at most 8)::

    PYTHONPATH=$PWD python recipes/build_tiny_shapes.py --out-root runs/tiny_shapes

On a CPU, with tiny step counts, to check that every stage runs (writes nothing into the package)::

    PYTHONPATH=$PWD python recipes/build_tiny_shapes.py --out-root /tmp/tiny_smoke --smoke

Stages (each training stage is its own process, so every recipe runs exactly as launched by hand):

1. tokenizer: ``recipes/train_tokenizer.py --config vq_f4_tiny`` -> ``ROOT/tokenizer/tokenizer.safetensors``.
2. generator: ``python -m aimkit.training --config aim_tiny_shapes init_from=<tokenizer>`` (the generic
   training recipe; shapes rendered and tokenized on the fly) -> ``ROOT/generator/final``. Before it
   starts, a few timed training steps check that ``max_steps`` fits the time budget (``--budget-s``);
   if not, the step count is lowered and the record says so.
3. export: the trained generator, tokenizer included, stored as float16 (loading casts back to the
   model's dtype) -> ``aimkit/assets/aim_tiny_shapes/`` (config.json + model.safetensors); its config
   must equal the registered preset's, since ``aimkit.build("aim-tiny-shapes")`` builds from the preset.
4. evaluate the exported weights as users load them: conditional accuracy and Fréchet distance with
   the shipped shapes classifier over 1008 images (28 per class) at the preset's FID sampling
   defaults, a guidance sweep, the pretty defaults; a sample grid -> ``docs/images/aim_tiny_shapes_grid.png``.
5. record: ``aimkit/assets/aim_tiny_shapes/training_record.json`` (configs, commands, steps, seeds,
   device, wall times, final losses, evaluation). With ``OUT`` set in the environment, the weights
   folder, the grid and the logs are copied to ``$OUT`` as well.

Any failing stage stops the run with its error. A model below the quality target (conditional
accuracy 0.9) is still written, and the run exits with status 3. The run folder is locked
(:class:`aimkit._lock.FolderLock`) for the whole build, so a second build on it stops at once; the
export replaces the weights folder only once the new one is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aimkit._io import fsync_dir, write_text_atomic
from aimkit._lock import LOCK_NAME, FolderBusyError, FolderLock

REPO = Path(__file__).resolve().parent.parent
PRESET = "aim-tiny-shapes"
ACCURACY_TARGET = 0.9  # conditional accuracy at the preset's FID defaults
SIZE_LIMIT_MB = 12.5  # the whole shipped folder
EXPORT_DTYPE = torch.float16

# Step counts and evaluation sizes: the full build, and the CPU smoke run.
FULL = {"eval_images": 1008, "sweep": (1.0, 2.0, 3.0, 4.0, 5.0), "sweep_images": 360, "grid_per_class": 2,
        "tokenizer_args": [], "generator_args": [], "sample_batch": 504}
SMOKE = {"eval_images": 50, "sweep": (1.0, 3.0), "sweep_images": 36, "grid_per_class": 1,
         "tokenizer_args": ["--steps", "20", "--batch-size", "8", "--num-workers", "0",
                            "--mixed-precision", "no", "--eval-images", "50", "--cpu"],
         "generator_args": ["max_steps=20", "global_batch_size=8", "num_workers=0", "mixed_precision='no'",
                            "data_size=2000", "log_every=5", "warmup_steps=5", "checkpoint_every=20"],
         "sample_batch": 64}


def say(text: str) -> None:
    print(f"[build_tiny_shapes {time.strftime('%H:%M:%S')}] {text}", flush=True)


class StageFailed(RuntimeError):
    pass


def run_stage(name: str, cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` with the repository on PYTHONPATH, echo and log its output; returns seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    say(f"stage {name}: {' '.join(cmd)}")
    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        raise StageFailed(f"stage {name} failed with exit status {code} after {seconds:.0f} s (log: {log_path})")
    say(f"stage {name} done in {seconds:.0f} s")
    return seconds


# --------------------------------------------------------------------------------------------
# time budget
# --------------------------------------------------------------------------------------------


def probe_step_seconds(batch_size: int, device: str, steps: int = 15, warmup: int = 5) -> float:
    """Seconds per generator training step (tokenizer encode + the trainer's own step,
    :class:`aimkit.training.TrainStep`, with the loop's per-step host sync), measured on random
    weights with the training recipe's batch, optimizer, parameter groups and execution policy."""
    import aimkit
    from aimkit.data.shapes import make_batch
    from aimkit.training import execution_policy, load_config, make_optimizer, make_train_step
    from aimkit.training.step import resolved_policy

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    cfg = load_config("aim_tiny_shapes", ["output_dir=unused", f"global_batch_size={batch_size}"])
    policy, _ = resolved_policy(execution_policy(cfg), torch.device(device), mixed_precision=cfg.mixed_precision)
    gen = aimkit.build(PRESET, pretrained=False, device=device, policy=policy, **cfg.model_args).train()
    gen.tokenizer.requires_grad_(False).eval()
    lr = cfg.lr if cfg.lr is not None else cfg.lr_per_256 * batch_size / 256
    opt = make_optimizer(gen, lr=lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.adam_eps,
                         capturable=policy.train_step == "graph")
    train_step = make_train_step(gen, opt, policy, max_grad_norm=cfg.grad_clip or None,
                                 amp_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None)
    images, labels = make_batch(batch_size, seed=12345)
    images, labels = images.to(device), labels.to(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        with torch.no_grad():
            codes = gen.tokenizer.encode(images)
        loss, norm = train_step.forward_backward([(codes, labels)])
        _ = loss.item() + norm.item()  # the training loop reads both every step (a host sync)
        train_step.finish(update=True)
    sync()
    seconds = (time.perf_counter() - start) / steps
    del gen, opt, train_step
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


# --------------------------------------------------------------------------------------------
# export and evaluation
# --------------------------------------------------------------------------------------------


def export(final_dir: Path, assets_dir: Path) -> dict[str, Any]:
    """Write the trained generator (tokenizer included) to ``assets_dir`` in float16.

    The new folder is written beside ``assets_dir`` (``.NAME.new``) and swapped in only when
    complete, so a failed or killed export leaves the previous weights where they were."""
    import aimkit

    gen = aimkit.build(final_dir)
    preset = aimkit.resolve_config(PRESET)
    if gen.config != preset:
        raise StageFailed(
            f"the trained config differs from the registered {PRESET!r} preset, so aimkit.build({PRESET!r}) "
            f"could not load it:\n trained: {gen.config}\n preset:  {preset}"
        )
    staging, previous = assets_dir.with_name(f".{assets_dir.name}.new"), assets_dir.with_name(f".{assets_dir.name}.old")
    if previous.exists() and not assets_dir.exists():
        os.replace(previous, assets_dir)  # an export killed between its two renames: the old weights go back
    for leftover in (staging, previous):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        gen.save_pretrained(staging, include_tokenizer=True, storage_dtype=EXPORT_DTYPE)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if assets_dir.exists():
        os.replace(assets_dir, previous)
    os.replace(staging, assets_dir)
    fsync_dir(assets_dir.parent)
    shutil.rmtree(previous)
    files = {}
    for path in sorted(assets_dir.iterdir()):
        path.chmod(0o644)  # the atomic writer creates 0600 temp files; package data must be readable
        files[path.name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"dtype": str(EXPORT_DTYPE).replace("torch.", ""), "files": files,
            "generator_parameters": gen.num_params(),
            "tokenizer_parameters": gen.num_params(include_tokenizer=True) - gen.num_params()}


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def evaluate(gen, plan: dict[str, Any], device: str, classifier) -> dict[str, Any]:
    """Conditional accuracy / Fréchet distance at the FID defaults, a guidance sweep, pretty defaults."""
    from aimkit.eval.quality import evaluate_generated

    def score(n: int, seed: int, **sampling) -> dict[str, Any]:
        labels = balanced_labels(n, gen.num_classes)
        start = time.perf_counter()
        images = gen.generate(labels, seed=seed, batch_size=plan["sample_batch"], progress=False, **sampling)
        seconds = time.perf_counter() - start
        report = evaluate_generated(images, labels, classifier=classifier)
        out = dataclasses.asdict(report)
        out.update(seed=seed, sampling_seconds=round(seconds, 2), **{k: v for k, v in sampling.items()})
        return out

    fid = gen.config.fid_sampling
    main = score(plan["eval_images"], seed=0, defaults="fid")
    main["sampling"] = dataclasses.asdict(fid)
    say(f"FID defaults {dataclasses.asdict(fid)}: conditional accuracy {main['conditional_accuracy']:.4f}, "
        f"Fréchet distance {main['frechet_distance']:.3f} over {main['num_images']} images "
        f"(classifier on real images {main['classifier_accuracy_real']:.4f})")
    sweep = []
    for cfg_scale in plan["sweep"]:
        r = score(plan["sweep_images"], seed=1, defaults="fid", cfg_scale=cfg_scale)
        say(f"  cfg {cfg_scale:.1f}: accuracy {r['conditional_accuracy']:.4f}, Fréchet {r['frechet_distance']:.3f} "
            f"({r['num_images']} images)")
        sweep.append(r)
    pretty = score(plan["sweep_images"], seed=2, defaults="pretty")
    pretty["sampling"] = dataclasses.asdict(gen.config.pretty_sampling)
    say(f"pretty defaults: accuracy {pretty['conditional_accuracy']:.4f}, Fréchet {pretty['frechet_distance']:.3f}")
    return {"fid_defaults": main, "cfg_sweep": sweep, "pretty_defaults": pretty,
            "classifier": "aimkit/assets/shapes_classifier.safetensors"}


def save_sample_grid(gen, per_class: int, path: Path) -> dict[str, Any]:
    """``per_class`` samples of every class (pretty defaults, seed 0), shown at 2x, captioned;
    one shape per row, its six colours side by side."""
    from aimkit.data.shapes import COLOURS, class_names
    from aimkit.samplers import save_grid

    labels = torch.arange(gen.num_classes).repeat_interleave(per_class)
    images = gen.generate(labels, seed=0, defaults="pretty", output="uint8", progress=False)
    images = images.repeat(2, axis=1).repeat(2, axis=2)  # (N, 128, 128, 3), nearest-neighbour 2x
    save_grid(images, path, nrow=len(COLOURS) * per_class, labels=labels.tolist(), class_names=class_names())
    path.chmod(0o644)
    return {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "labels": f"classes 0..35, {per_class} samples each; rows are shapes", "seed": 0,
            "defaults": "pretty", "scale": 2}


def last_metrics(path: Path) -> dict[str, Any]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise StageFailed(f"{path} holds no metrics")
    return lines[-1]


def device_record(device: str) -> dict[str, Any]:
    from aimkit.kernels.mamba_ssm import kernel_info

    rec = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
           "host_cpus": os.cpu_count()}
    if device == "cuda":
        rec.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
        info = kernel_info()
        rec["mamba_kernels"] = {"available": info["available"], "versions": info["versions"]}
    else:
        rec["cpu"] = platform.processor() or platform.machine()
    return rec


def copy_out(out_env: Path, assets_dir: Path, grid: Path, logs: dict[str, Path]) -> None:
    """Copy the weights folder, the grid and the logs under ``$OUT``."""
    out_env.mkdir(parents=True, exist_ok=True)
    target = out_env / assets_dir.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(assets_dir, target)
    if grid.is_file():
        shutil.copy2(grid, out_env / grid.name)
    log_dir = out_env / "logs"
    log_dir.mkdir(exist_ok=True)
    for name, path in logs.items():
        if path.is_file():
            shutil.copy2(path, log_dir / name)
    say(f"copied {target}, {grid.name} and {len(logs)} logs to {out_env}")


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", type=Path, required=True, help="run folder for checkpoints and logs")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check with tiny step counts; assets and grid go under --out-root")
    parser.add_argument("--overwrite", action="store_true", help="delete a non-empty --out-root first")
    parser.add_argument("--tokenizer-steps", type=int, help="override the tokenizer recipe's steps")
    parser.add_argument("--generator-steps", type=int, help="override the generator recipe's max_steps")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="wall-clock budget of the whole run; the generator's steps are lowered to fit "
                        "(0: no limit; default 450)")
    parser.add_argument("--assets-dir", type=Path, help="default: aimkit/assets/aim_tiny_shapes")
    parser.add_argument("--grid", type=Path, help="default: docs/images/aim_tiny_shapes_grid.png")
    return parser.parse_args(argv)


def salvage(root: Path, assets_dir: Path) -> None:
    """After a failure: copy whatever logs (and exported weights) exist to ``$OUT/failed``."""
    out_env = os.environ.get("OUT")
    if not out_env or not root.is_dir():
        return
    target = Path(out_env) / "failed"
    target.mkdir(parents=True, exist_ok=True)
    for path in list(root.glob("*.log")) + list(root.glob("*/*.json")) + list(root.glob("*/*.jsonl")):
        shutil.copy2(path, target / f"{path.parent.name}_{path.name}" if path.parent != root else target / path.name)
    if (assets_dir / "model.safetensors").is_file():
        shutil.copytree(assets_dir, target / assets_dir.name, dirs_exist_ok=True)
    say(f"copied the logs{' and the exported weights' if (assets_dir / 'model.safetensors').is_file() else ''} "
        f"to {target}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.out_root.resolve()
    assets_dir = (args.assets_dir or (root / "assets" / "aim_tiny_shapes" if args.smoke
                                      else REPO / "aimkit" / "assets" / "aim_tiny_shapes")).resolve()
    grid_path = (args.grid or (root / "aim_tiny_shapes_grid.png" if args.smoke
                               else REPO / "docs" / "images" / "aim_tiny_shapes_grid.png")).resolve()
    started = False
    if root.exists() and not root.is_dir():
        raise StageFailed(f"--out-root {root} exists and is not a folder")
    lock = FolderLock(root, command="build_tiny_shapes")
    try:
        lock.acquire()  # before anything in root is looked at or deleted
    except FolderBusyError as exc:
        raise StageFailed(str(exc)) from None
    try:
        if any(entry.name != LOCK_NAME for entry in root.iterdir()) and not args.overwrite:
            raise StageFailed(f"{root} is not empty; pass --overwrite or choose a new --out-root")
        started = True
        return build(args, root, assets_dir, grid_path)
    except BaseException:
        if started:
            salvage(root, assets_dir)
        raise
    finally:
        lock.release()


def clear_run_folder(root: Path) -> None:
    """Delete everything in ``root`` but its lock file (which the caller holds)."""
    for entry in root.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def build(args: argparse.Namespace, root: Path, assets_dir: Path, grid_path: Path) -> int:
    """The five stages; see the module docstring."""
    t_start = time.perf_counter()
    plan = SMOKE if args.smoke else FULL
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if not args.smoke and device != "cuda":
        raise StageFailed("no CUDA device: the full build needs a GPU (use --smoke for a CPU check)")
    clear_run_folder(root)  # main() holds root's lock: the lock file stays
    say(f"{'smoke run' if args.smoke else 'full build'} on {device}; run folder {root}; assets -> {assets_dir}")
    py = sys.executable
    logs: dict[str, Path] = {}
    record: dict[str, Any] = {"model": PRESET, "smoke": args.smoke, "command": [Path(py).name] + sys.argv,
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    # ---- 1. tokenizer
    tok_dir = root / "tokenizer"
    tok_cmd = [py, "recipes/train_tokenizer.py", "--config", "recipes/configs/tokenizers/vq_f4_tiny.yaml",
               "--out", str(tok_dir), *plan["tokenizer_args"]]
    if args.tokenizer_steps:
        tok_cmd += ["--steps", str(args.tokenizer_steps)]
    logs["tokenizer.log"] = root / "tokenizer.log"
    tok_seconds = run_stage("tokenizer", tok_cmd, logs["tokenizer.log"])
    tok_record = json.loads((tok_dir / "tokenizer.json").read_text())
    logs["tokenizer.json"] = tok_dir / "tokenizer.json"
    logs["tokenizer_metrics.jsonl"] = tok_dir / "metrics.jsonl"
    recon_accuracy = tok_record["heldout"]["classifier_accuracy_reconstructed"]
    if not args.smoke and recon_accuracy < ACCURACY_TARGET:
        say(f"WARNING: the classifier recognises only {recon_accuracy:.3f} of the tokenizer's reconstructions; "
            "a generator decoding through it cannot do much better")

    # ---- 2. generator, through the generic training recipe
    import yaml

    gen_config = yaml.safe_load((REPO / "recipes" / "configs" / "aim_tiny_shapes.yaml").read_text())
    steps = args.generator_steps or gen_config["max_steps"]
    budget_note = None
    if args.budget_s and device == "cuda":
        step_s = probe_step_seconds(gen_config["global_batch_size"], device)
        spent = time.perf_counter() - t_start
        reserve = 25 + 75  # generator process start-up and final save; export + evaluation + grid
        affordable = int((args.budget_s - spent - reserve) / (1.15 * step_s))
        say(f"probe: {step_s * 1e3:.1f} ms per generator step; {spent:.0f} s spent; "
            f"{steps} steps need ~{steps * step_s:.0f} s, the budget allows {affordable}")
        if affordable < steps:
            lowered = max(affordable // 100 * 100, 100)
            budget_note = f"max_steps lowered from {steps} to {lowered} to fit --budget-s {args.budget_s:g}"
            steps = lowered
            say("WARNING: " + budget_note)
        record["probe_step_ms"] = round(step_s * 1e3, 2)
    gen_dir = root / "generator"
    gen_cmd = [py, "-m", "aimkit.training", "--config", "recipes/configs/aim_tiny_shapes.yaml",
               f"init_from={tok_dir / 'tokenizer.safetensors'}", f"output_dir={gen_dir}", *plan["generator_args"]]
    if steps != gen_config["max_steps"] and not args.smoke:
        gen_cmd.append(f"max_steps={steps}")
    logs["generator.log"] = root / "generator.log"
    gen_seconds = run_stage("generator", gen_cmd, logs["generator.log"])
    logs["generator_metrics.jsonl"] = gen_dir / "metrics.jsonl"
    logs["generator_config.yaml"] = gen_dir / "config.yaml"
    resolved = yaml.safe_load((gen_dir / "config.yaml").read_text())

    # ---- 3. export
    say(f"stage export -> {assets_dir}")
    exported = export(gen_dir / "final", assets_dir)
    size_mb = sum(f["bytes"] for f in exported["files"].values()) / 1e6
    sizes = ", ".join(f"{name} ({info['bytes'] / 1e6:.2f} MB)" for name, info in exported["files"].items())
    say(f"exported {sizes}")

    # ---- 4. evaluate the exported weights, loaded the way users load them
    import aimkit
    from aimkit.assets import embedded_weights
    from aimkit.eval.quality import load_default_classifier

    t_eval = time.perf_counter()
    shipped = embedded_weights(PRESET) is not None and embedded_weights(PRESET).resolve() == assets_dir
    source = PRESET if shipped else assets_dir  # the package's own folder: load it as users do
    gen = aimkit.build(source, device=device)
    say(f"stage evaluate: aimkit.build({str(source)!r}) on {device}")
    classifier = load_default_classifier(device)
    evaluation = evaluate(gen, plan, device, classifier)
    grid = save_sample_grid(gen, plan["grid_per_class"], grid_path)
    eval_seconds = time.perf_counter() - t_eval
    say(f"stage evaluate done in {eval_seconds:.0f} s; grid {grid_path}")

    # ---- 5. record
    gen_last = last_metrics(gen_dir / "metrics.jsonl")
    record.update({
        "environment": device_record(device),
        "aimkit_version": aimkit.__version__,
        "generator_parameters": exported["generator_parameters"],
        "tokenizer_parameters": exported["tokenizer_parameters"],
        "stored_dtype": exported["dtype"],
        "files": exported["files"],
        "folder_mb": round(size_mb, 3),
        "tokenizer": {
            "command": [Path(c).name if c == py else c for c in tok_cmd],
            "recipe": tok_record["recipe"],
            "steps": tok_record["steps"],
            "seeds": {"init": tok_record["recipe"]["seed"], "data": tok_record["recipe"]["data_seed"]},
            "final_log": tok_record["final_log"],
            "heldout": tok_record["heldout"],
            "codes_restarted": tok_record["codes_restarted"],
            "wall_time_s": round(tok_seconds, 1),
        },
        "generator": {
            "command": [Path(c).name if c == py else c for c in gen_cmd],
            "resolved_config": resolved,
            "steps": gen_last["step"],
            "seed": resolved["seed"],
            "budget_note": budget_note,
            "final_loss": gen_last["loss"],
            "final_log": gen_last,
            "wall_time_s": round(gen_seconds, 1),
        },
        "evaluation": evaluation,
        "evaluation_wall_time_s": round(eval_seconds, 1),
        "grid": grid,
        "total_wall_time_s": round(time.perf_counter() - t_start, 1),
    })
    record_path = assets_dir / "training_record.json"
    write_text_atomic(record_path, json.dumps(record, indent=2) + "\n")
    record_path.chmod(0o644)
    say(f"wrote {record_path}; total {record['total_wall_time_s']:.0f} s")
    if os.environ.get("OUT"):
        copy_out(Path(os.environ["OUT"]), assets_dir, grid_path, logs)

    # ---- checks, after everything is written
    problems = []
    if size_mb > SIZE_LIMIT_MB:
        problems.append(f"the weights folder is {size_mb:.2f} MB (limit {SIZE_LIMIT_MB} MB)")
    accuracy = evaluation["fid_defaults"]["conditional_accuracy"]
    if not args.smoke and accuracy < ACCURACY_TARGET:
        problems.append(f"conditional accuracy {accuracy:.4f} < target {ACCURACY_TARGET} (tokenizer "
                        f"reconstructions: {recon_accuracy:.4f})")
    if problems:
        say("TARGET MISSED: " + "; ".join(problems))
        return 3
    say("all stages done" + ("" if args.smoke else f"; conditional accuracy {accuracy:.4f} >= {ACCURACY_TARGET}"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StageFailed as exc:
        say(f"FAILED: {exc}")
        sys.exit(1)
