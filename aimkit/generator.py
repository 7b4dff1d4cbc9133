"""The class-conditional token generator (AiM) assembled from registered components.

Data flow (B images, N = 256 tokens, D = d_model, V = vocab)::

    labels (B,) ──class_embed──► c (B, D) ──conditioning──► per-layer (shift, scale, gate)
    codes (B, N) ─tok_embed (+ pos_embed)─► x (B, N-1, D)
    [c ; x] (B, N, D) ──backbone (modulated blocks, norm_f)──► (final adaLN) ──lm_head──► logits (B, N, V)
    logits ──sampler──► codes ──tokenizer.decode──► images (B, 3, H, W)

Two architecture switches separate the AiM layout from LlamaGen's: ``config.pos_embed`` (a learned
absolute position table, AiM; without it positions come from the backbone's rotary embedding) and
``config.tie_head`` (the head shares the token embedding, AiM; else its own weight). The final
adaLN layer exists when the conditioning kind modulates (``conditioning.final_modulation``: the
adaLN kinds), not for ``class-token``.

The state-dict layout is aimkit's own (``tok_embed``, ``backbone.layers.i.mixer``, ``conditioning``,
...); :mod:`aimkit.official` maps it to and from the official AiM checkpoint names,
:mod:`aimkit.llamagen` to and from LlamaGen's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._saved import write_saved
from .backbones.base import InferenceParams, modulate
from .conditioning.label import ClassEmbedder
from .config import ComponentSpec, GeneratorConfig
from .errors import CheckpointError, ConfigError
from .kernels.compiled import TrainCompiled
from .policy import ExecutionPolicy, default_policy
from .registry import BACKBONES, CONDITIONING, TOKENIZERS

__all__ = ["Generator", "DecodeCondition", "FinalLayer", "token_cross_entropy"]


class PartsReport(NamedTuple):
    """How a weight file's parts (``"generator"``, ``"tokenizer"``) met a model: ``missing`` from
    the file (the model keeps its own weights there), ``unused`` (in the file, not in the model)."""

    missing: list[str]
    unused: list[str]


class DecodeCondition(NamedTuple):
    """Per-sample conditioning computed once per decoding run.

    Attributes:
        class_emb: (B, D) class embeddings (the first sequence position).
        mods: (B, n_layer, chunks, D) modulation rows of every block (batch first, like every
            field, so that a decoder can split a condition by rows).
        final: (B, 2, D) shift and scale of the final adaLN; (B, 0, D) without a final adaLN layer.
    """

    class_emb: Tensor
    mods: Tensor
    final: Tensor


def _cross_entropy_fp32(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


_CROSS_ENTROPY = TrainCompiled(_cross_entropy_fp32, "loss")


def token_cross_entropy(logits: Tensor, targets: Tensor, compiled: bool = True) -> Tensor:
    """Mean next-token cross-entropy computed in float32.

    With ``compiled`` (a model passes its ``policy.compile_loss``), on CUDA it runs compiled
    (:mod:`aimkit.kernels.compiled`): the float32 cast, the
    log-softmax and its backward fuse, instead of materialising float32 copies of the
    (B * N, V) logits (1 GiB for a 64 x 256 batch over 16384 codes).

    Args:
        logits: (B, N, V) in any float dtype.
        targets: (B, N) int64 codes.
        compiled: allow the compiled function (False: always the plain one).

    Returns:
        () float32 loss.
    """
    if not compiled:
        return _cross_entropy_fp32(logits, targets)
    return _CROSS_ENTROPY(logits.device, logits, targets)


class FinalLayer(nn.Module):
    """Final adaLN before the LM head: ``modulate(norm(x), shift, scale)``, zero-initialised."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
        self.modulation = nn.Linear(d_model, 2 * d_model, device=device, dtype=dtype)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def shift_scale(self, c: Tensor) -> Tensor:
        """c (B, D) -> (B, 2, D): shift then scale."""
        return self.modulation(F.silu(c)).view(c.shape[0], 2, -1)

    def forward(self, x: Tensor, final: Tensor) -> Tensor:
        """x (B, L, D), final (B, 2, D) -> (B, L, D)."""
        return modulate(self.norm(x), final[:, 0], final[:, 1])


def _check_policy(policy: Any) -> ExecutionPolicy:
    if policy is None:
        return default_policy()
    if isinstance(policy, dict):
        return ExecutionPolicy.from_dict(policy)
    if not isinstance(policy, ExecutionPolicy):
        raise ConfigError(f"policy must be an ExecutionPolicy or a mapping of its fields, got {type(policy).__name__}")
    return policy


def _build(registry, spec: ComponentSpec, *args, **kwargs):
    cls = registry.get(spec.name)
    if spec.config is not None:
        kwargs["config"] = spec.config
    return cls(*args, **kwargs)


class Generator(nn.Module):
    """A class-conditional autoregressive image-token generator with an optional tokenizer.

    Build one with :func:`aimkit.build` rather than directly.

    Args:
        config: the full configuration (components by registry name); its
            ``decode_position_offset`` chooses where decoding feeds image token k (see there).
        policy: which implementation each operation runs (:class:`~aimkit.policy.ExecutionPolicy`);
            None takes :func:`~aimkit.policy.default_policy` once, now. Shared with the backbone
            and every sub-module that branches on it; change it with :meth:`set_policy`.
    """

    def __init__(self, config: GeneratorConfig, device=None, dtype=None, policy: ExecutionPolicy | None = None):
        super().__init__()
        config = config.resolved()
        check_tokens = getattr(config.backbone.config, "check_num_tokens", None)  # e.g. a 2-D rotary grid
        if check_tokens is not None:
            check_tokens(config.num_tokens)
        self.config = config
        self.policy = _check_policy(policy)
        d, kw = config.d_model, {"device": device, "dtype": dtype}
        self.class_embed = ClassEmbedder(config.num_classes, d, config.class_dropout, **kw)
        self.tok_embed = nn.Embedding(config.vocab_size, d, **kw)
        self.pos_embed = nn.Embedding(config.num_tokens + 1, d, **kw) if config.pos_embed else None
        self.backbone = _build(BACKBONES, config.backbone, d, config.n_layer, norm_eps=config.norm_eps,
                               policy=self.policy, **kw)
        self.conditioning = _build(
            CONDITIONING, config.conditioning, d, config.n_layer, self.backbone.mod_chunks, **kw
        )
        self.final_layer = FinalLayer(d, config.norm_eps, **kw) if self.conditioning.final_modulation else None
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False, **kw)
        if config.tie_head:
            self.lm_head.weight = self.tok_embed.weight  # tied, as in AiM
        else:
            nn.init.zeros_(self.lm_head.weight)  # LlamaGen's initialisation of its untied output
        self.tokenizer = None if config.tokenizer is None else _build(TOKENIZERS, config.tokenizer).to(**kw)
        self._init_embeddings()
        self.set_policy(self.policy)  # the tokenizer's modules too

    def set_policy(self, policy: ExecutionPolicy) -> Generator:
        """Use ``policy`` from now on, here and in every sub-module that holds one (``.policy``).

        Captured CUDA graphs are keyed on the policy, so the next sampling call captures anew.
        Returns self."""
        policy = _check_policy(policy)
        for module in self.modules():
            if isinstance(getattr(module, "policy", None), ExecutionPolicy):
                module.policy = policy
        return self

    def extra_repr(self) -> str:
        return f"policy={self.policy.describe()}"

    def _init_embeddings(self) -> None:
        for emb in (self.class_embed.embedding_table, self.tok_embed, self.pos_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

    # ------------------------------------------------------------------ properties
    @property
    def position_offset(self) -> int:
        """0: decoding feeds token k at position k (as training); 1: the official sampler's k + 1."""
        return self.config.decode_position_offset

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int:
        """Label of the unconditional branch used for classifier-free guidance."""
        return self.class_embed.null_class

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.tok_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embed.weight.dtype

    def num_params(self, include_tokenizer: bool = False) -> int:
        """Parameter count with tied weights counted once (tokenizer excluded by default)."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if not include_tokenizer and name.startswith("tokenizer."):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    @property
    def tied_keys(self) -> tuple[str, ...]:
        """State-dict keys that repeat another tensor and are never stored (``lm_head.weight`` when tied)."""
        return ("lm_head.weight",) if self.config.tie_head else ()

    def generator_state_dict(self) -> dict[str, Tensor]:
        """State dict without the tokenizer's tensors and without the tied ``lm_head.weight``."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith("tokenizer.") and k not in self.tied_keys
        }

    # ------------------------------------------------------------------ validation
    def _check_labels(self, labels: Tensor, allow_null: bool = False) -> Tensor:
        if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ConfigError("labels must be an integer tensor of shape (B,)")
        if labels.dim() != 1:
            raise ConfigError(f"labels must have shape (B,), got {tuple(labels.shape)}")
        if labels.numel() == 0:
            raise ConfigError("labels is empty: nothing to generate or score")
        hi = self.num_classes + (1 if allow_null else 0)
        if self._validate_values(labels) and (int(labels.min()) < 0 or int(labels.max()) >= hi):
            allowed = f"[0, {self.num_classes}]" + (" (the last is the null class)" if allow_null else "")
            allowed = allowed if allow_null else f"[0, {self.num_classes})"
            raise ConfigError(f"labels must be in {allowed} (got min {int(labels.min())}, max {int(labels.max())})")
        return labels.long()

    def _validate_values(self, t: Tensor) -> bool:
        """Range checks read values on the host: free on CPU, a device sync on CUDA. Skipped for
        device tensors while training (the data pipeline checks codes once when it writes them)."""
        return t.device.type == "cpu" or not self.training

    def _check_codes(self, codes: Tensor) -> Tensor:
        if not torch.is_tensor(codes) or codes.is_floating_point() or codes.dim() != 2:
            raise ConfigError("codes must be an integer tensor of shape (B, num_tokens)")
        if codes.shape[1] != self.num_tokens:
            raise ConfigError(f"codes must have {self.num_tokens} tokens per sample, got {codes.shape[1]}")
        if codes.shape[0] == 0:
            raise ConfigError("codes is empty: the batch has no samples")
        if self._validate_values(codes) and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ConfigError(f"codes must be in [0, {self.vocab_size})")
        return codes.long()

    # ------------------------------------------------------------------ teacher-forced forward
    def forward(self, codes: Tensor, labels: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """Teacher-forced logits, exactly as the official training forward.

        Args:
            codes: (B, N) int64 image tokens in raster order.
            labels: (B,) int64 class labels in [0, num_classes) (the null class is allowed too).
            force_drop: optional (B,) bool, replace those labels by the null class.
        Returns:
            logits (B, N, V): position k predicts token k (position 0 sees only the class token).
        """
        codes = self._check_codes(codes)
        labels = self._check_labels(labels, allow_null=True)
        if labels.shape[0] != codes.shape[0]:
            raise ConfigError(f"got {codes.shape[0]} code rows but {labels.shape[0]} labels")
        if force_drop is not None and (force_drop.dtype != torch.bool or force_drop.shape != labels.shape):
            raise ConfigError("force_drop must be a bool tensor of shape (B,)")
        c = self.class_embed(labels, force_drop)  # (B, D)
        x = self.tok_embed(codes[:, :-1])  # (B, N-1, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(codes.shape[1] - 1, device=codes.device))
        x = torch.cat([c.unsqueeze(1).to(x.dtype), x], dim=1)  # (B, N, D)
        h = self.backbone(x, self.conditioning(c))  # (B, N, D)
        if self.final_layer is not None:
            h = self.final_layer(h, self.final_layer.shift_scale(c))
        return self.lm_head(h.to(self.lm_head.weight.dtype))

    def loss(self, codes: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy of the teacher-forced forward (float32)."""
        return token_cross_entropy(self(codes, labels), codes.long(), compiled=self.policy.compile_loss)

    # ------------------------------------------------------------------ incremental decoding
    def condition(self, labels: Tensor) -> DecodeCondition:
        """Everything label-dependent for a decoding run; labels (B,) may include the null class."""
        labels = self._check_labels(labels, allow_null=True)
        c = self.class_embed.embedding_table(labels)  # never dropped at inference
        mods = torch.stack(self.conditioning(c), dim=1)  # (B, n_layer, chunks, D)
        final = c.new_zeros(c.shape[0], 0, c.shape[1]) if self.final_layer is None else self.final_layer.shift_scale(c)
        return DecodeCondition(c, mods, final)

    def allocate_inference_cache(
        self, batch_size: int, dtype: torch.dtype | None = None, max_seqlen: int | None = None
    ) -> InferenceParams:
        """A fresh cache for ``batch_size`` sequences of the class token + ``num_tokens`` tokens."""
        max_seqlen = max_seqlen or self.num_tokens + 1
        params = InferenceParams(
            max_seqlen=max_seqlen,
            max_batch_size=batch_size,
            position=torch.zeros((), dtype=torch.long, device=self.device),
        )
        params.key_value_memory_dict = self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
        return params

    def _head(self, h: Tensor, cond: DecodeCondition) -> Tensor:
        """Logits (B, V) of the last position, in the model dtype.

        The product runs in the model dtype (as the official code does; an fp32 head cost 6% of an
        AiM-B decode step on an H200) and is returned as computed: the samplers upcast where they
        read it, which is exact, instead of a separate float32 copy per step (benchmarks/notes.md)."""
        h = h[:, -1] if self.final_layer is None else self.final_layer(h[:, -1:], cond.final)[:, -1]
        return self.lm_head(h.to(self.lm_head.weight.dtype))

    def prefill(self, cond: DecodeCondition, inference_params: InferenceParams) -> Tensor:
        """Run the class token (position 0) and fill the cache; returns logits (B, V) for token 0
        (model dtype).

        The caller advances ``inference_params`` by one afterwards."""
        x = cond.class_emb.unsqueeze(1).to(self.dtype)  # (B, 1, D)
        if inference_params.seqlen_offset == 0:  # one position from scratch: the step path is cheaper
            h = self.backbone.prefill_first(x, cond.mods.unbind(1), inference_params)
        else:
            h = self.backbone(x, cond.mods.unbind(1), inference_params=inference_params)
        return self._head(h, cond)

    def decode_step(self, tokens: Tensor, cond: DecodeCondition, inference_params: InferenceParams) -> Tensor:
        """Feed image token k (at cache position k + 1); returns logits (B, V) for token k + 1
        (model dtype).

        Reads the position from the device tensor ``inference_params.position`` only, so the step
        can be captured in a CUDA graph. The caller advances ``inference_params`` afterwards."""
        x = self.tok_embed(tokens.view(-1, 1))  # (B, 1, D)
        if self.pos_embed is not None:
            pos = inference_params.position - 1 + self.position_offset  # () long
            x = x + self.pos_embed.weight.index_select(0, pos.view(1))
        h = self.backbone.step(x, cond.mods.unbind(1), inference_params)
        return self._head(h, cond)

    # ------------------------------------------------------------------ conversions
    def convert_conditioning(self, kind: str, approximate: bool = False, **kwargs: Any) -> Generator:
        """A copy of this generator with another conditioning kind (``"adaln"``, ``"adaln-group"``, ...).

        Exact (``conversion_error`` 0.0, the same maps; logits equal up to the float rounding of
        another summation order) whenever the layers that the target makes share a projection
        already have equal weights: always from a kind to a finer one (single → group(G) →
        group(k·G) → per-layer adaLN). Projections the target keeps are copied bit for bit with
        their bias split, so converting back gives the original tensors (a group's bias folded into
        per-layer biases comes back in the tables). Otherwise an
        :class:`~aimkit.conditioning.adaln.InexactConversionError`, unless ``approximate=True``,
        which averages the weights and records the largest change in ``result.conversion_error``
        (with a warning). A bfloat16 or float16 model that must merge a bias into one tensor rounds
        it: reported the same way. Between ``class-token`` and the adaLN kinds no exact conversion
        exists (the adaLN kinds modulate a final norm the other lacks): refused, approximate or not.
        On the meta device only conversions exact by structure are made.
        """
        from .conditioning._convert import convert_conditioning

        return convert_conditioning(self, kind, approximate, **kwargs)

    # ------------------------------------------------------------------ generation
    def generate(self, labels=None, **kwargs):
        """Sample images; see :func:`aimkit.samplers.generate` for the arguments."""
        from .samplers.api import generate

        return generate(self, labels, **kwargs)

    def generate_batches(self, batches, **kwargs):
        """Sample ``(labels, seed)`` batches, decoding one while the next samples; see
        :func:`aimkit.samplers.generate_batches`."""
        from .samplers.api import generate_batches

        return generate_batches(self, batches, **kwargs)

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        **build_kwargs: Any) -> Generator:
        """Build a generator saved by :meth:`save_pretrained` or :meth:`push_to_hub`, exactly.

        Args:
            name_or_path: a local folder, a Hub repository id ``"org/name"`` or ``"hf-hub:org/name"``
                (fetched through the hub cache; ``HF_HUB_OFFLINE=1`` reads only the cache).
            revision: a Hub branch, tag or commit. token: a Hub token (None: the stored login).
            cache_dir: the hub cache (default ``HF_HUB_CACHE``).
            **build_kwargs: passed to :func:`aimkit.build` (``device``, ``dtype``, ``policy``, ...).
        """
        from .hub import from_pretrained

        return from_pretrained(name_or_path, revision=revision, token=token, cache_dir=cache_dir, **build_kwargs)

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        include_tokenizer: bool = True,
        storage_dtype: torch.dtype | None = None,
        *,
        model_card: bool = True,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs: Any,
    ) -> Path:
        """Write ``model.safetensors``, ``generation_config.json`` (the sampling settings) and
        ``config.json`` (the architecture: registry names and configs of every component, dtype),
        then the model card ``README.md``. The execution policy is not saved: it belongs to
        whoever runs the model.

        Args:
            directory: created if missing.
            include_tokenizer: also store the tokenizer's tensors.
            storage_dtype: cast floating tensors to float16, bfloat16, float32 or float64 (a
                dtype or its name) in the file only (e.g. float16 to halve a shipped file);
                ``aimkit.build`` still builds in the model's dtype.
            model_card: write ``README.md`` (:func:`aimkit.hub.model_card`; it summarises a
                ``training_record.json`` found in ``directory``); a README.md that aimkit did not
                generate is kept.
            push_to_hub: then push the folder to ``repo_id`` (default: the folder's name) as one commit.
            repo_id: the Hub repository (``"org/name"``), also named in the card's loading example.
            **push_kwargs: ``token``, ``private``, ``commit_message``, ``revision``, ``create_pr``
                (:func:`aimkit.hub.upload_saved`).
        """
        from . import hub
        from ._lock import FolderLock

        hub.check_push_options(push_kwargs, push_to_hub)
        storage_dtype = hub.check_storage_dtype(storage_dtype)
        directory = Path(directory)
        state = self.generator_state_dict()
        if include_tokenizer and self.tokenizer is not None:
            state.update({f"tokenizer.{k}": v for k, v in self.tokenizer.state_dict().items()})
        if storage_dtype is not None:
            state = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in state.items()}
        dtype = str(self.dtype).replace("torch.", "")
        cfg = {"aimkit_format": 1, "dtype": dtype, "generator": self.config.architecture_dict()}
        generation = {"aimkit_format": 1, "generation": self.config.generation_dict()}
        if push_to_hub and repo_id is None:
            repo_id = directory.resolve().name  # named in the card's loading example too
        with FolderLock(directory, command="save_pretrained", remove=True):  # a second save is refused
            write_saved(directory, state, cfg, generation)
            if model_card:
                hub.write_model_card(self, directory, repo_id=repo_id)
        if push_to_hub:
            hub.upload_saved(directory, repo_id, **push_kwargs)
        return directory

    def push_to_hub(self, repo_id: str, *, include_tokenizer: bool = True, storage_dtype: torch.dtype | None = None,
                    **push_kwargs: Any):
        """Push weights, configs and model card to the Hub repository ``repo_id`` as one commit
        (created if missing). ``push_kwargs``: ``token``, ``private``, ``commit_message``,
        ``revision``, ``create_pr``. Returns huggingface_hub's ``CommitInfo``."""
        from .hub import check_push_options, push_to_hub

        check_push_options(push_kwargs, push=True)
        return push_to_hub(self, repo_id, include_tokenizer=include_tokenizer, storage_dtype=storage_dtype,
                           **push_kwargs)

    def _aimkit_expected(self, state: dict[str, Tensor]) -> tuple[dict[str, Any], PartsReport]:
        """The ``name -> shape`` that aimkit-layout ``state`` must match, and which parts are absent
        from the file or present in it without a place in this model.

        A file may hold the generator, the tokenizer, or both; a tied ``lm_head.weight`` (the
        token embedding's) is never expected. A tokens-only generator (``tokenizer=None``) leaves a
        file's tokenizer tensors unused: :meth:`_without_unused` takes them out."""
        expected = {k: v.shape for k, v in self.state_dict().items() if k not in self.tied_keys}
        has_tok = any(k.startswith("tokenizer.") for k in state)
        has_gen = any(not k.startswith("tokenizer.") for k in state)
        report = PartsReport([], [])
        if not has_tok:
            expected = {k: v for k, v in expected.items() if not k.startswith("tokenizer.")}
            if self.tokenizer is not None:
                report.missing.append("tokenizer")
        elif self.tokenizer is None:
            report.unused.append("tokenizer")
        if not has_gen:
            expected = {k: v for k, v in expected.items() if k.startswith("tokenizer.")}
            report.missing.append("generator")
        return expected, report

    @staticmethod
    def _without_unused(state: dict[str, Tensor], report: PartsReport) -> dict[str, Tensor]:
        """``state`` less the tensors of the parts ``report`` names unused (a whole tokenizer only)."""
        if "tokenizer" not in report.unused:
            return state
        return {k: v for k, v in state.items() if not k.startswith("tokenizer.")}

    def _untie(self, state: dict[str, Tensor], source: str, compare: bool = True) -> dict[str, Tensor]:
        """``state`` with a tied ``lm_head.weight`` folded into ``tok_embed.weight``."""
        state = dict(state)
        if self.config.tie_head and "lm_head.weight" in state:
            tied = state.pop("lm_head.weight")
            if "tok_embed.weight" not in state:
                state["tok_embed.weight"] = tied
            elif compare and not torch.equal(tied, state["tok_embed.weight"]):
                raise CheckpointError(f"{source}: lm_head.weight differs from tok_embed.weight but they are tied")
        return state

    def check_aimkit_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint",
                                file_names: dict[str, str] | None = None) -> PartsReport:
        """Check names and shapes of aimkit-layout tensors (values are not read: meta tensors do).

        ``file_names``: aimkit name -> the file's name, for messages about renamed files.
        Returns which parts the file lacks and which it holds unused; raises
        :class:`CheckpointError` when it does not fit."""
        from .weights import check_state_dict

        state = self._untie(state, source, compare=False)
        expected, report = self._aimkit_expected(state)
        check_state_dict(expected, self._without_unused(state, report), what=source, file_names=file_names)
        return report

    def load_aimkit_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint",
                               file_names: dict[str, str] | None = None) -> PartsReport:
        """Load aimkit-layout tensors strictly. Two parts may differ from the model, and are
        reported, not loaded: a file without tokenizer tensors (``missing``: the tokenizer keeps its
        weights), and a file's whole tokenizer when this generator has none (``unused``).

        ``file_names``: aimkit name -> the file's name, for messages about renamed files."""
        from .weights import check_state_dict

        state = self._untie(state, source)
        expected, report = self._aimkit_expected(state)
        state = self._without_unused(state, report)
        check_state_dict(expected, state, what=source, file_names=file_names)
        own = self.state_dict()
        wrong_kind = [f"{(file_names or {}).get(k, k)}: {v.dtype}" for k, v in state.items()
                      if own[k].is_floating_point() and (not v.is_floating_point() or v.is_complex())]
        if wrong_kind:  # copy_ would cast integers, booleans or complex numbers into the weights silently
            shown = ", ".join(wrong_kind[:5]) + (", ..." if len(wrong_kind) > 5 else "")
            raise CheckpointError(f"{source} holds {len(wrong_kind)} tensors that are not real floating point where "
                                  f"the model has weights ({shown})")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        return report
