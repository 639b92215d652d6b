"""transferkit's default freeze-all head against what a careful engineer gets by hand, over seeds.

For a labelled folder, a backbone and seeds: runs ``transferkit.train`` with its defaults (the exact
head, C chosen by cross-validation, flip-averaged features), then on the very same cached features
and split (train + val -> test) fits scikit-learn's ``LogisticRegression`` at every C of the grid
and takes the best test accuracy *in hindsight* (the ceiling of any C choice), and the plain floor
of ../shared/datasets/README.md (``LogisticRegression()`` on plain, un-mirrored features). Prints one
row per seed and the means, with the gap to the hindsight ceiling in test images. Prints
measurements; asserts nothing.

Usage (real ImageNet weights via a Keras home whose ``models`` is ../shared/imagenet-weights):
    KERAS_HOME=/tmp/kh python benchmarks/head_defaults.py ../shared/datasets/hymenoptera_data mobilenet_v2 \
        [--seeds 0-4] [KEY=VALUE ...]
    KERAS_HOME=/tmp/kh python benchmarks/head_defaults.py ../shared/datasets/sign_language_digits mobilenet_v2 \
        val_fraction=0.1 test_fraction=0.2      # the seeded 80/20 split of the datasets README
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import yaml


def features_of(folder, backbone: str, cache_dir: str, *, mirror: bool):
    """The cached features of every image of ``folder`` (cache hits after a run)."""
    from transferkit.cache import FeatureCache, FeatureSpec, extract_features
    from transferkit.models.registry import get_backbone
    from transferkit.models.weights import load_backbone, resolve_weights

    spec = get_backbone(backbone)
    model = load_backbone(spec, resolve_weights(spec, "imagenet"), spec.input_size, mirror=mirror)
    cache = FeatureCache(cache_dir, FeatureSpec.for_model(spec, model))
    return extract_features(model, [folder.abs_path(p) for p in folder.paths], cache, verbose=0).vectors


def main(image_dir: str, backbone: str, seeds: list[int], **overrides) -> None:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from transferkit.config import TrainConfig
    from transferkit.data.scan import scan_folder
    from transferkit.heads.softmax import C_GRID
    from transferkit.training.run import assign_roles, train

    warnings.simplefilter("ignore", ConvergenceWarning)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = str(Path(tmp) / "cache")
        for seed in seeds:
            config = TrainConfig(image_dir, str(Path(tmp) / f"run{seed}"), backbone=backbone, seed=seed,
                                 cache_dir=cache_dir).replace(**overrides)
            metrics = train(config, verbose=0).metrics
            folder = scan_folder(image_dir, seed=seed, val_fraction=config.val_fraction,
                                 test_fraction=config.test_fraction)
            roles = assign_roles(folder, np.ones(len(folder.paths), bool), seed)
            fit, test = np.isin(roles, ["train", "val"]), roles == "test"
            y = folder.labels
            ours_x = features_of(folder, backbone, cache_dir, mirror=config.flip_average)
            plain_x = features_of(folder, backbone, cache_dir, mirror=False)

            def score(x, c, fit=fit, test=test, y=y):
                model = LogisticRegression(C=c, max_iter=5000, solver="newton-cg").fit(x[fit], y[fit])
                return float(model.score(x[test], y[test]))

            hindsight = max(score(ours_x, c) for c in C_GRID)
            rows.append({
                "seed": seed, "test_images": int(test.sum()), "transferkit": round(metrics["test"]["accuracy"], 4),
                "C": metrics["head_fit"]["C"], "hindsight_best_C": round(hindsight, 4),
                "gap_images": round((hindsight - metrics["test"]["accuracy"]) * test.sum(), 1),
                "floor_plain_C1": round(score(plain_x, 1.0), 4),
                "head_fit_seconds": metrics["head_fit"]["fit_seconds"],
                "extraction_images_per_second": metrics["extraction"]["images_per_second"],
            })
            print(json.dumps(rows[-1]), flush=True)
    mean = {key: round(float(np.mean([row[key] for row in rows])), 4)
            for key in ("transferkit", "hindsight_best_C", "gap_images", "floor_plain_C1", "head_fit_seconds")}
    print(json.dumps({"image_dir": image_dir, "backbone": backbone, "overrides": overrides, "seeds": seeds,
                      "mean": mean}, indent=2))


def _seeds(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


if __name__ == "__main__":
    args = sys.argv[3:]
    seeds = [0, 1, 2, 3, 4]
    if args[:1] == ["--seeds"]:
        seeds, args = _seeds(args[1]), args[2:]
    # Extra KEY=VALUE arguments override TrainConfig defaults, e.g. flip_average=false.
    main(sys.argv[1], sys.argv[2], seeds, **{k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args)})
