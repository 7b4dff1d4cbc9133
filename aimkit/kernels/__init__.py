"""Every operation with a fast path: its PyTorch reference and its kernel, one module each.

Which of the two runs is decided by the :class:`~aimkit.policy.ExecutionPolicy` of the model that
calls them; nothing here reads global state. Operation (policy field) -> reference -> kernel:

* ``scan`` -> :func:`.ssd.ssd_chunked` -> mamba-ssm's chunked scan, gated norm and causal-conv1d
  (:mod:`.mamba_ssm`, a lazy loader);
* ``state_update`` -> :func:`.ssd.ssd_recurrent_step_` -> :func:`.ssm_step.ssm_step_`;
* ``conv_step`` -> the Mamba2 mixer's PyTorch ring step -> :func:`.conv_step.conv_step_`;
* ``decode_glue`` -> :func:`.glue.add_norm_modulate` -> :func:`.decode_glue.add_norm_modulate`
  (a folded gated norm's row factor: :class:`.glue.DeferredRowNorm`);
* ``sampling`` -> :func:`aimkit.samplers.logits.sample` -> :func:`.sampling.sample_guided_`;
* ``decode_attention`` -> :func:`.rope_cache.rope_cache_write_reference` and
  :func:`.attention_decode.decode_attention_reference` (the transformer's PyTorch step) ->
  :func:`.rope_cache.rope_cache_write_` and :func:`.attention_decode.decode_attention`;
* ``compile_glue`` / ``compile_loss`` -> the plain function -> :class:`.compiled.TrainCompiled`.

Importing this package, :mod:`.ssd`, :mod:`.glue`, :mod:`.rotary`, :mod:`.mamba_ssm` or :mod:`.compiled` never
imports Triton, mamba-ssm or causal-conv1d. The Triton modules (:mod:`.ssm_step`,
:mod:`.conv_step`, :mod:`.decode_glue`, :mod:`.sampling`, :mod:`.attention_decode`,
:mod:`.rope_cache`) import Triton and are imported by their
callers only when the policy picks the kernel for CUDA tensors.
"""

__all__: list = []
