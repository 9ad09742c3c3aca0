"""The standalone lab's tests: one lab, built once for all of them (conftest.py)."""
