"""Tests run on every Keras backend (a package, so its conftest does not shadow tests/conftest.py)."""
