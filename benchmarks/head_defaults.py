"""transferkit's default freeze-all run against the plain Keras + scikit-learn floor, in one run.

For a labelled folder and a backbone: runs ``transferkit.train`` with its defaults, then fits
scikit-learn's ``LogisticRegression()`` on the very same cached features and split (train + val ->
test), the floor given in ../shared/datasets/README.md, and prints both accuracies, their
difference and the head's training time.  Prints measurements; asserts nothing.

Usage (real ImageNet weights via a Keras home whose ``models`` is ../shared/imagenet-weights):
    KERAS_HOME=/tmp/kh python benchmarks/head_defaults.py ../shared/datasets/hymenoptera_data mobilenet_v2 \
        [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml


def main(image_dir: str, backbone: str, **overrides) -> None:
    from sklearn.linear_model import LogisticRegression

    from transferkit.backbones import get_backbone
    from transferkit.cache import FeatureCache, FeatureSpec, extract_features
    from transferkit.config import TrainConfig
    from transferkit.data import scan_folder
    from transferkit.training import assign_roles, train
    from transferkit.weights import load_backbone, resolve_weights

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(image_dir, str(Path(tmp) / "run"), backbone=backbone).replace(**overrides)
        result = train(config, verbose=0)
        metrics = result.metrics
        spec = get_backbone(backbone)
        folder = scan_folder(image_dir)
        model = load_backbone(spec, resolve_weights(spec, "imagenet"), spec.input_size)
        cache = FeatureCache(Path(metrics["extraction"]["cache_dir"]).parent, FeatureSpec.for_model(spec, model))
        features = extract_features(model, [folder.abs_path(p) for p in folder.paths], cache, verbose=0)
    roles = assign_roles(folder, features.ok, seed=0)
    x, y = features.vectors, folder.labels
    fit_rows, test_rows = (roles == "train") | (roles == "val"), roles == "test"
    floor = LogisticRegression(max_iter=5000).fit(x[fit_rows], y[fit_rows]).score(x[test_rows], y[test_rows])
    ours = metrics["test"]["accuracy"]
    print(json.dumps({
        "image_dir": image_dir, "backbone": backbone, "overrides": overrides, "test_images": int(test_rows.sum()),
        "transferkit_accuracy": round(ours, 4), "logreg_floor_accuracy": round(floor, 4),
        "difference": round(ours - floor, 4), "epochs_run": metrics["epochs_run"],
        "refit_epochs": metrics["refit_epochs"], "head_fit_seconds": metrics["timings"]["fit_seconds"],
        "extraction_images_per_second": metrics["extraction"]["images_per_second"],
    }, indent=2))


if __name__ == "__main__":
    # Extra KEY=VALUE arguments override TrainConfig defaults, e.g. patience=20.
    main(sys.argv[1], sys.argv[2], **{k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])})
