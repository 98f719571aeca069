"""``distill demo``: everything local, on a real teacher trained on scikit-learn's digits.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
"""
