"""Example plugins: components registered from outside aimkit, checked by tests/test_contracts.py."""
