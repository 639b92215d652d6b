"""Evaluation: metrics, evaluating a run, test-time augmentation, ensembles and Grad-CAM."""
