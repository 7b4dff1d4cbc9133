"""aimkit.eval."""
