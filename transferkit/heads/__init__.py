"""Heads on cached features: the scikit-learn registry, the exact softmax, the estimator, comparisons."""
