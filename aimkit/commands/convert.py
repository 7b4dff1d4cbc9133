"""``aimkit convert``: an official AiM checkpoint (or any loadable file) to aimkit's own format."""

from __future__ import annotations

HELP = "convert official AiM weights into an aimkit save_pretrained directory"
DESCRIPTION = (
    "Load a checkpoint strictly into a preset (official AiM layout with mamba./vqvae. keys, LlamaGen's "
    "VQ file via --tokenizer-weights, or aimkit's layout) and write config.json + model.safetensors, "
    "which aimkit.build(DIR) loads. Optionally change the conditioning kind exactly (--conditioning)."
)


def add_arguments(parser) -> None:
    parser.add_argument("weights", help="checkpoint file or directory (.safetensors, .bin, .pt)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--model", required=True, help="preset the weights belong to, e.g. aim-xl")
    parser.add_argument("--tokenizer-weights", default=None, help="separate tokenizer file (LlamaGen vq_ds16_c2i.pt)")
    parser.add_argument("--conditioning", default=None, help="convert to this conditioning kind, e.g. adaln")
    parser.add_argument("--num-groups", type=int, default=None, help="groups for --conditioning adaln-group")


def run(args) -> int:
    import aimkit

    gen = aimkit.build(args.model, pretrained=args.weights, tokenizer_weights=args.tokenizer_weights)
    if args.conditioning:
        kwargs = {} if args.num_groups is None else {"num_groups": args.num_groups}
        gen = gen.convert_conditioning(args.conditioning, **kwargs)
    out = gen.save_pretrained(args.out)
    print(f"wrote {out} ({gen.num_params():,} generator parameters)")
    return 0
