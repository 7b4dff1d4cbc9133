"""aimkit.tokenizers."""
