"""aimkit.data."""
