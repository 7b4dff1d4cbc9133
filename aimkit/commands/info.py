"""``aimkit info MODEL``: what a preset or saved model is, and how it would run here."""

from __future__ import annotations

from . import _args

HELP = "show a model's components, size and execution policy"
DESCRIPTION = (
    "Show a preset's or saved model's components, size and parameter count, and the execution "
    "policy it would run with on DEVICE: for each operation, whether its kernel or its PyTorch reference "
    "runs. Nothing is allocated (the model is built on PyTorch's meta device)."
)

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run", "describe_model"]


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a preset name (see `aimkit list`) or a save_pretrained directory")
    parser.add_argument("--device", choices=_args.DEVICE_CHOICES, default="auto",
                        help="device the policy is resolved for (default auto: CUDA when available)")
    parser.add_argument("--policy", type=_args.policy, default=None, metavar="FIELD=VALUE,...",
                        help="execution-policy changes, e.g. state_dtype=model,decode_graph=false")


def describe_model(name_or_path: str, device: str = "cpu", policy=None) -> str:
    """The text ``aimkit info`` prints (a few lines), built without allocating any tensor."""
    import torch

    from ..build import resolve_config
    from ..generator import Generator
    from ..policy import default_policy

    policy = policy or default_policy()
    config = resolve_config(name_or_path)
    meta = Generator(config, device=torch.device("meta"), policy=policy)
    tokenizer = "none (tokens only)" if config.tokenizer is None else config.tokenizer.name
    lines = [
        f"model: {name_or_path}",
        f"components: backbone {config.backbone.name}, conditioning {config.conditioning.name}, "
        f"tokenizer {tokenizer}, sampler {config.sampler.name}",
        f"size: d_model {config.d_model}, {config.n_layer} layers, {config.num_tokens} tokens, "
        f"{config.num_classes} classes, {meta.num_params():,} generator parameters",
        f"policy: {policy.describe()}",
        f"on {device}: " + ", ".join(f"{op} {how}" for op, how in policy.resolved(device).items()),
        f"  state_dtype {policy.state_dtype}, decode_graph {policy.decode_graph}, train_step {policy.train_step}, "
        f"compile_glue {policy.compile_glue}, compile_loss {policy.compile_loss}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    print(describe_model(args.model, _args.resolve_device(args.device), args.policy))
    return 0
