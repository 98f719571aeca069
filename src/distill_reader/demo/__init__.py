"""``distill demo``: everything local, on a real teacher trained on scikit-learn's digits."""
