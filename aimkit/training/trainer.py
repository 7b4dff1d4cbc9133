"""Train a class-conditional AiM generator with HF accelerate: one readable loop, one YAML config.

::

    aimkit train --config aim_b data=tokens/in256 output_dir=runs/aim_b          # one device
    accelerate launch --multi_gpu --num_processes 8 -m aimkit.training \\
        --config aim_b data=tokens/in256 output_dir=runs/aim_b                     # 8 GPUs (DDP)
    aimkit train --config aim_b output_dir=runs/aim_b --resume auto                # continue

:class:`Trainer` reads top to bottom: :meth:`~Trainer.setup` builds the accelerator, the
generator (:func:`aimkit.build`, with the run's execution policy), the data, an AdamW with weight
decay on matrices only (:mod:`aimkit.training.optim`) and the step the policy names
(:mod:`aimkit.training.step`); :meth:`~Trainer.resume` loads a checkpoint; :meth:`~Trainer.fit`
runs, per optimizer step, ``grad_accum`` micro-batches per process -> one clipped AdamW update,
skipped (and counted) when the loss or the gradient norm is not finite, then logs, saves and
stops on SIGTERM / SIGINT (after a checkpoint; a second SIGINT stops at once).

Output directory::

    OUT/config.yaml          the resolved config
    OUT/metrics.jsonl        one JSON line per log step (``aimkit plot OUT`` draws it)
    OUT/checkpoints/         see aimkit.training.checkpoint
    OUT/samples/             step-XXXXXXXX.png every sample_every steps (aimkit.training.samples)
    OUT/final/               Generator.save_pretrained -> aimkit.build("OUT/final"); with ema_decay
                             the moving average of the weights, the trained ones in OUT/final/raw
                             and the record in OUT/final/ema.json (aimkit.training.ema)

One run at a time writes OUT (a lock file, ``OUT/.aimkit.lock``, held by the main process).
Multi-node runs need ``output_dir`` on a file system every node sees. FSDP is untested.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._distributed import distributed_cpu, launched_as_main
from .._io import check_writable_dir, write_text_atomic
from .._lock import LOCK_NAME, FolderLock
from ..errors import ConfigError, did_you_mean
from ._guards import StopSignal, TrainingStopped, check_finite, check_replicas, signal_on_any_process
from ._metrics import MetricsFile, StepWindow
from ._trackers import flat_config
from .checkpoint import Checkpointer, ResumeSearch, disk_errors, resume_search
from .config import INT_LIMIT, SEED_LIMIT, TrainConfig, config_to_yaml, execution_policy, resolve_mixed_precision
from .data import ShapesImages, StepBatches, batch_layout, make_dataset
from .ema import EMA
from .optim import make_optimizer, make_scheduler
from .samples import SampleGrids
from .step import Batch, make_train_step, resolved_policy

__all__ = ["TrainResult", "Trainer", "train"]


@dataclass
class TrainResult:
    """What :func:`train` did."""

    step: int  # optimizer steps done (including skipped ones)
    final_dir: Path | None  # the save_pretrained export (None when stopped early)
    last_checkpoint: Path | None
    skipped_steps: int  # non-finite steps skipped in this run
    stopped_by: str | None = None  # "SIGTERM", "SIGINT", "stop_after" or None
    losses: list[float] = field(default_factory=list)  # per-step mean loss of this run (main process)

    @property
    def exit_code(self) -> int:
        return {"SIGTERM": 143, "SIGINT": 130}.get(self.stopped_by or "", 0)


def train(cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    """Run (or continue) training as ``cfg`` says.

    The main process holds :class:`aimkit._lock.FolderLock` on ``output_dir`` for the whole run,
    so a second run on the same directory stops at once with one line and changes nothing.

    Args:
        cfg: the run's configuration.
        resume: None (start fresh; an output directory that already holds checkpoints is an
            error), ``"auto"`` (continue from the newest checkpoint in ``output_dir`` that
            verifies, if there is one) or a path (a checkpoint, or a directory holding
            checkpoints). Newer checkpoints that fail verification are named and passed over.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: a bad setting, or an output_dir that cannot be written.
        CheckpointError: no checkpoint to resume from verifies and loads.
        TrainingStopped: the run diverged (nothing non-finite is ever saved).
        FolderBusyError: another run holds output_dir.
    """
    out = Path(cfg.output_dir)
    pretrained = pretrained_weights(cfg.init_from)  # checked before anything is written
    main_env = launched_as_main()
    lock, created, writing = None, _missing_dirs(out), False
    lock_was_there = (out / LOCK_NAME).exists()
    if main_env:
        check_writable_dir(out, "output_dir", error=ConfigError)
        lock = FolderLock(out, command="aimkit train").acquire()
    try:
        # where to resume from, checked before anything is allocated
        search = resume_search(resume, out, print if main_env else (lambda *a, **k: None))
        resume_from = search.next() if search is not None else None
        if search is not None and resume_from is None and search.any:
            raise search.failure()
        trainer = Trainer(cfg, pretrained)
        trainer.setup()
        writing = True  # resume() sets stale checkpoints aside and writes config.yaml
        trainer.resume(search, resume_from)
        return trainer.fit()
    finally:
        if lock is not None:
            # refused during setup (a bad model_args, batch layout or data): leave no trace
            lock.remove = not (writing or lock_was_there)
            lock.release()
            if not writing:
                _remove_empty(created)


def _missing_dirs(path: Path) -> list[Path]:
    """The folders that creating ``path`` would add, deepest first."""
    missing, path = [], path.absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that a refused run created, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): written by someone else meanwhile
            return


def pretrained_weights(init_from: str | None) -> Any:
    """What ``build(pretrained=...)`` gets for ``init_from``: False (from scratch), a path, an
    ``hf-hub:`` reference, or, for a preset name, the weights that preset ships or publishes."""
    if init_from is None:
        return False  # from scratch, even for presets that ship weights (aim-tiny-shapes)
    if init_from.startswith("hf-hub:") or Path(init_from).expanduser().exists():
        return init_from
    from ..assets import embedded_weights
    from ..presets import PUBLISHED_WEIGHTS
    from ..registry import list_models

    presets = list_models()
    if init_from in presets:
        shipped = embedded_weights(init_from)
        if shipped is not None:
            return shipped
        if init_from in PUBLISHED_WEIGHTS:
            record = PUBLISHED_WEIGHTS[init_from]
            return f"hf-hub:{record.repo_id}@{record.filename}"
        raise ConfigError(f"init_from: preset {init_from!r} ships no weights and none are published; "
                          "pass a weight file or a save_pretrained directory")
    raise ConfigError(f"init_from {init_from!r} is neither an existing file or directory nor a preset name"
                      f"{did_you_mean(init_from, presets, quote=False)} "
                      f"(presets: {', '.join(presets)}; or hf-hub:ORG/NAME)")


def _check_tracker(log_with: str | None) -> None:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if log_with is not None and not available[log_with]():
        raise ConfigError(f"log_with: {log_with} needs `pip install {log_with}`")


def _plain(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


class Trainer:
    """One training run: ``setup()``, ``resume(...)``, ``fit()`` (what :func:`train` calls).

    Args:
        cfg: the run's configuration.
        pretrained: what ``aimkit.build(pretrained=...)`` gets (:func:`pretrained_weights`).
    """

    def __init__(self, cfg: TrainConfig, pretrained: Any = False):
        self.cfg, self.pretrained, self.out = cfg, pretrained, Path(cfg.output_dir)
        self.step = 0

    # ------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Accelerator, generator, data, optimizer, schedule and step, in that order."""
        self._setup_accelerator()
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        _check_tracker(self.cfg.log_with)
        precision, self.precision_source = resolve_mixed_precision(self.cfg.mixed_precision)
        self.cfg = cfg = dataclasses.replace(self.cfg, mixed_precision=precision)  # what runs is what is recorded
        self.policy = execution_policy(cfg)
        self.acc = Accelerator(cpu=distributed_cpu(), mixed_precision=cfg.mixed_precision, log_with=cfg.log_with,
                               project_dir=str(self.out), dynamo_backend="inductor" if cfg.compile else None)
        if precision == "fp16" and self.acc.scaler is None:  # accelerate neither autocasts nor scales there
            raise ConfigError(f"mixed_precision fp16 needs a CUDA device (this run is on {self.acc.device.type}, "
                              f"where it would train in float32); use mixed_precision=bf16 or no")
        self.rank, self.world, self.main = self.acc.process_index, self.acc.num_processes, self.acc.is_main_process
        self.micro, self.accum = batch_layout(cfg, self.world)
        self.say = self.acc.print

    def _setup_model(self) -> None:
        """The generator, identically initialised on every process; a tokenizer is frozen."""
        from accelerate.utils import set_seed

        from ..build import build
        from ..class_names import class_names_for_training

        set_seed(self.cfg.seed)
        names = class_names_for_training(self.cfg.data, self.cfg.model, self.cfg.model_args)  # the folder's
        self.gen = build(self.cfg.model, pretrained=self.pretrained, device=self.acc.device, policy=self.policy,
                         **self.cfg.model_args, **names).train()
        if self.gen.tokenizer is not None:
            self.gen.tokenizer.requires_grad_(False).eval()  # frozen: it only encodes shapes images
        SampleGrids.check(self.gen, self.cfg.sample_every)
        self.samples = SampleGrids(self.out, self.cfg.sample_every, self.cfg.sample_num, self.cfg.seed)
        # the average starts from the initial weights; a resume replaces it with the checkpoint's
        self.ema = EMA(self.gen, self.cfg.ema_decay) if self.cfg.ema_decay is not None else None

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.dataset = make_dataset(cfg, self.gen)
        self.encode = self.gen.tokenizer.encode if isinstance(self.dataset, ShapesImages) else None
        self.steps_per_epoch = len(self.dataset) // cfg.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the dataset has {len(self.dataset)} items, fewer than global_batch_size "
                              f"{cfg.global_batch_size}")
        total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        if not total < INT_LIMIT:
            raise ConfigError(f"epochs {cfg.epochs} x {self.steps_per_epoch} steps per epoch is too many steps; "
                              "lower epochs")
        self.total_steps = math.ceil(total)
        self.stop_at = min(self.total_steps, cfg.stop_after) if cfg.stop_after is not None else self.total_steps

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.lr_per_256 * cfg.global_batch_size / 256
        if not math.isfinite(self.peak_lr):
            raise ConfigError(f"lr_per_256 {cfg.lr_per_256} x global_batch_size {cfg.global_batch_size} / 256 "
                              "is not a finite learning rate")
        self.policy, self.step_reason = resolved_policy(  # what runs, in the log and the records
            self.policy, self.acc.device, processes=self.world, mixed_precision=cfg.mixed_precision,
            compiled=cfg.compile, distributed=self.acc.distributed_type)
        self.gen.set_policy(self.policy)
        graph = self.policy.train_step == "graph"
        optimizer = make_optimizer(self.gen, lr=self.peak_lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                   eps=cfg.adam_eps, fused=cfg.fused_adamw, capturable=graph)
        self.scheduler = make_scheduler(optimizer, total=self.total_steps, warmup=cfg.warmup_steps,
                                        schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
        self.model, self.optimizer = self.acc.prepare(self.gen, optimizer)
        self.train_step = make_train_step(
            self.model, self.optimizer, self.policy, accelerator=self.acc,
            max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else None,
            amp_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None, ema=self.ema, grad_accum=self.accum)

    # ------------------------------------------------------------------------- resume

    def resume(self, search: ResumeSearch | None, checkpoint: Path | None) -> None:
        """Weights, optimizer, schedule, RNG and data position from ``checkpoint`` (falling back
        through ``search``), or a fresh start at step 0; then the output files and the log."""
        from accelerate.utils import set_seed

        self.run_state: dict[str, Any] = {"total_skipped": 0}
        if checkpoint is None:
            set_seed((self.cfg.seed + self.rank) % SEED_LIMIT)  # label dropout differs per process; init is done
        else:
            checkpoint, self.run_state = search.load(checkpoint, self.acc, self.gen, self.optimizer, self.scheduler,
                                                     self.ema)
            self.step = self.run_state["step"]
            if self.step > self.total_steps:  # it would export a model trained longer than asked
                raise ConfigError(f"{checkpoint} is at step {self.step}, past this run's {self.total_steps} steps; "
                                  "raise max_steps (or epochs), or pass --resume with an earlier checkpoint")
            old_batch = self.run_state.get("global_batch_size")
            if old_batch != self.cfg.global_batch_size:
                self.say(f"warning: global_batch_size changed ({old_batch} -> {self.cfg.global_batch_size}); "
                         "the data order differs from an uninterrupted run")
            old_total = self.run_state.get("total_steps")  # absent in checkpoints before 2026-12-03
            if old_total is not None and old_total != self.total_steps:
                self.say(f"warning: total steps changed ({old_total} -> {self.total_steps}); the learning-rate "
                         "schedule from here on differs from the interrupted run's")
            self.say(f"resumed from {checkpoint} at step {self.step}")
        self.checkpointer = Checkpointer(self.acc, self.out / "checkpoints", self.cfg.keep_last, self.ema)
        self.checkpointer.last = checkpoint
        if checkpoint is not None:  # a later branch must not be what the next --resume auto continues
            for path in self.checkpointer.set_aside_later(self.step):
                self.say(f"set aside {path.name}: it is newer than the checkpoint this run continues from")
        self.acc.wait_for_everyone()
        self._start_output()

    def _start_output(self) -> None:
        cfg = self.cfg
        self.metrics = MetricsFile(self.out / "metrics.jsonl")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "config.yaml", config_to_yaml(cfg))
            self.metrics.truncate(self.step)  # rows logged after the checkpoint we resume from
        if cfg.log_with:
            self.acc.init_trackers(cfg.project_name, config=flat_config(_plain(cfg)))  # scalars and strings only
        self.say(
            f"{cfg.model}: {self.gen.num_params():,} params | {self.world} process(es) x batch {self.micro} x "
            f"accum {self.accum} = {cfg.global_batch_size} | peak lr {self.peak_lr:.3g} | {self.total_steps} steps "
            f"({self.steps_per_epoch}/epoch) | mixed precision {cfg.mixed_precision} ({self.precision_source}) | "
            f"{'ema ' + str(cfg.ema_decay) + ' | ' if self.ema is not None else ''}{self.acc.device} | "
            f"{self.policy.train_step} step ({self.step_reason}) | policy: {self.policy.describe()}"
        )

    # ------------------------------------------------------------------------- the loop

    def fit(self) -> TrainResult:
        """Train from ``self.step`` to the end (or ``stop_after``, or a signal)."""
        from tqdm.auto import tqdm

        self.result = TrainResult(step=self.step, final_dir=None, last_checkpoint=self.checkpointer.last,
                                  skipped_steps=0)
        self.consecutive_bad = self.run_state.get("consecutive_nonfinite", 0)
        self.window = StepWindow()
        self.bar = tqdm(total=self.stop_at, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (self.main and self.cfg.progress_bar))
        with StopSignal() as stop:
            while self.step < self.stop_at:
                batches = self._epoch_batches()
                for _ in range(self.step % self.steps_per_epoch, self.steps_per_epoch):
                    lr, grad_norm = self._one_step(batches)
                    self._log(lr, grad_norm)
                    if self.main and self.samples.due(self.step):
                        self.samples.write(self.gen, self.step, self.ema, self.acc.trackers)
                    signalled = signal_on_any_process(self.acc, stop.received)
                    if signalled or self._checkpoint_due():
                        self.result.last_checkpoint = self.save()
                    if signalled:
                        return self._stop_on_signal(signalled)
                    if self.step >= self.stop_at:
                        break
        self.bar.close()
        return self._finish()

    def _epoch_batches(self) -> Iterator[Batch]:
        """The batches of this process from ``self.step`` to the end of its epoch."""
        epoch, start = divmod(self.step, self.steps_per_epoch)
        self.dataset.set_epoch(epoch)
        sampler = StepBatches(len(self.dataset), seed=self.cfg.seed, epoch=epoch, start_step=start,
                              micro=self.micro, accum=self.accum, rank=self.rank, world=self.world)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers,
            pin_memory=self.acc.device.type == "cuda",
            generator=torch.Generator(),  # keeps the global torch RNG untouched (exact resume)
        ))

    def _micro_batches(self, batches: Iterator[Batch]) -> list[Batch]:
        """The next ``grad_accum`` micro-batches as codes on the device (shapes images encoded)."""
        out = []
        for _ in range(self.accum):
            inputs, labels = next(batches)
            inputs = inputs.to(self.acc.device, non_blocking=True)
            labels = labels.to(self.acc.device, non_blocking=True)
            if self.encode is not None:
                with torch.no_grad():
                    inputs = self.encode(inputs)
            out.append((inputs, labels))
        return out

    def _one_step(self, batches: Iterator[Batch]):
        """One optimizer step, its update skipped when the loss or the gradient norm is not
        finite; returns ``(lr, grad_norm)`` of the step."""
        self.window.start()
        loss, grad_norm = self.train_step.forward_backward(self._micro_batches(batches))
        step_loss = self.acc.reduce(loss, reduction="mean").item()
        grad_norm = float(grad_norm)
        bad = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
        # fp16: gradient overflows are routine; the loss scaler skips those updates itself
        scaler_decides = self.cfg.mixed_precision == "fp16" and math.isfinite(step_loss)
        self.train_step.finish(update=not bad or scaler_decides)
        lr = float(self.scheduler.get_last_lr()[0])
        self.scheduler.step()
        self.step += 1
        self.bar.update(1)
        skipped = bad and not scaler_decides
        self._count_skipped(skipped, step_loss, grad_norm)
        self.result.losses.append(step_loss)
        self.window.add(step_loss, counted=not skipped)
        return lr, grad_norm

    def _count_skipped(self, skipped: bool, loss: float, grad_norm: float) -> None:
        if not skipped:
            self.consecutive_bad = 0
            return
        self.consecutive_bad += 1
        self.result.skipped_steps += 1
        if self.main:
            self.bar.write(f"step {self.step}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
                           f"({self.consecutive_bad} in a row)", file=sys.stdout)
        if self.consecutive_bad >= self.cfg.max_nonfinite:
            self.bar.close()
            last = self.checkpointer.last
            raise TrainingStopped(
                f"stopped at step {self.step}: {self.consecutive_bad} consecutive steps with a non-finite loss or "
                f"gradient; the last good checkpoint is {last if last else 'none (no checkpoint yet)'}; "
                "lower the lr, check the data, or raise max_nonfinite"
            )

    def _log(self, lr: float, grad_norm: float) -> None:
        """A metric line every ``log_every`` steps (and at the first and last); replica checks."""
        cfg, step = self.cfg, self.step
        replicas = bool(cfg.check_replicas_every) and step % cfg.check_replicas_every == 0
        if not (step % cfg.log_every == 0 or step == 1 or step == self.stop_at):
            if replicas:
                check_replicas(self.acc, self.gen, step)
            return
        w = self.window
        record = {
            "step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": w.mean_loss(), "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": w.tokens_per_s(cfg.global_batch_size * self.gen.num_tokens),
            "step_time_s": w.step_time(), "skipped_steps": self._total_skipped(),
        }
        if replicas:
            record["replica_fingerprints"] = check_replicas(self.acc, self.gen, step)
        if self.main:
            self.metrics.append(record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.write(
                f"step {step:>7d} | loss {record['loss']:.4f} | lr {lr:.3e} | grad {grad_norm:.3f} | "
                f"{record['tokens_per_s']:,.0f} tok/s | {record['step_time_s'] * 1e3:.1f} ms/step", file=sys.stdout)
        if cfg.log_with:
            self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        self.window = StepWindow()

    # ------------------------------------------------------------------------- save and finish

    def _total_skipped(self) -> int:
        return self.run_state.get("total_skipped", 0) + self.result.skipped_steps

    def _checkpoint_due(self) -> bool:
        """Every ``checkpoint_every`` steps and at the last step, never inside a non-finite streak."""
        due = self.step % self.cfg.checkpoint_every == 0 or self.step == self.stop_at
        return due and self.consecutive_bad == 0

    def save(self) -> Path:
        """A checkpoint of the current step (every process takes part)."""
        step, per_epoch = self.step, self.steps_per_epoch
        state = {
            "step": step, "epoch": step // per_epoch, "step_in_epoch": step % per_epoch,
            "samples_seen": step * self.cfg.global_batch_size, "global_batch_size": self.cfg.global_batch_size,
            "total_steps": self.total_steps, "num_processes": self.world, "consecutive_nonfinite": self.consecutive_bad,
            "total_skipped": self._total_skipped(), "config": _plain(self.cfg), "policy": self.policy.to_dict(),
        }
        return self.checkpointer.save(step, self.gen, self.optimizer, self.scheduler, state)

    def _stop_on_signal(self, signum: int) -> TrainResult:
        name = signal.Signals(signum).name
        self.bar.close()
        self.say(f"received {name}: saved {self.result.last_checkpoint}; continue with --resume auto")
        self.result.step, self.result.stopped_by = self.step, name
        return self._end()

    def _finish(self) -> TrainResult:
        """After the last step: ``stop_after`` reported, or the model exported to ``OUT/final``."""
        self.result.step = self.step
        if self.step < self.total_steps:
            self.result.stopped_by = "stop_after"
            self.say(f"stopped after step {self.step} of {self.total_steps} (stop_after); continue with --resume auto")
            return self._end()
        final = self.out / "final"
        check_finite(self.gen, self.step, self.checkpointer.last, str(final))  # never export a diverged model
        if self.main:
            with disk_errors(final):
                self._export(final)
        self.result.final_dir = final
        self.say(f"done: {self.step} steps; model saved to {final} (load with aimkit.build({str(final)!r}))")
        return self._end()

    def _export(self, final: Path) -> None:
        """``final``: the model (with a moving average: the averaged weights, the trained ones in
        ``final/raw`` and ``final/ema.json`` saying so). The record goes first and comes back last, so
        it never describes the weights of an earlier export or of an unfinished one."""
        (final / "ema.json").unlink(missing_ok=True)
        if self.ema is None:
            shutil.rmtree(final / "raw", ignore_errors=True)  # the trained weights of an earlier export
            self.gen.save_pretrained(final)
            return
        self.gen.save_pretrained(final / "raw")
        with self.ema.swapped_in():
            check_finite(self.gen, self.step, self.checkpointer.last, f"{final} (the moving average)")
            self.gen.save_pretrained(final)
        record = {"weights": "ema", "ema_decay": self.cfg.ema_decay, "step": self.step, "raw": "raw",
                  "note": "model.safetensors holds the moving average of the weights; raw/ the trained weights"}
        write_text_atomic(final / "ema.json", json.dumps(record, indent=1) + "\n")

    def _end(self) -> TrainResult:
        self.acc.wait_for_everyone()
        if self.cfg.log_with:
            self.acc.end_training()
        return self.result
