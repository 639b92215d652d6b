"""Backbones: the registry, weight files, model building and transferkit's custom Keras layers."""
