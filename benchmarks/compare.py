"""Wall time of ``transferkit compare`` with its default five heads on cached features (issue 5's target:
five heads on 3,000 cached images in under a minute on a 2-core CPU).

Runs the comparison twice on the same folder: the first run fills the feature cache (not counted),
the second is timed end to end (scan, cache look-up, every head's search and fit, scoring, the
files and plots). Prints the wall time, each head's fit time, the time per 1,000 training images,
and a linear extrapolation to 3,000 images (an optimistic one for the SVM, whose fit grows faster
than linearly). Also prints the load average, because the machine is shared. Asserts nothing.

Usage (real ImageNet weights via a Keras home whose ``models`` is ../shared/imagenet-weights):
    KERAS_HOME=/tmp/kh python benchmarks/compare.py [IMAGE_DIR] [BACKBONE]
    default: ../shared/datasets/sign_language_digits mobilenet_v2 (2,062 images, 10 classes)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main(image_dir: str, backbone: str) -> None:
    from transferkit.compare import CompareConfig, prepare_comparison, run_comparison
    from transferkit.runtime import start_tensorflow

    start_tensorflow()
    with tempfile.TemporaryDirectory() as tmp:
        warm = CompareConfig(image_dir, str(Path(tmp) / "warm"), backbone=backbone, heads=("ridge",))
        run_comparison(prepare_comparison(warm), verbose=0)  # fills the cache; not timed

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        config = CompareConfig(image_dir, str(Path(tmp) / "timed"), backbone=backbone)
        result = run_comparison(prepare_comparison(config), verbose=0)
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()[0]
    summary = result.summary
    counts = summary["num_images"]
    images = counts["train"] + counts["val"] + counts["test"]
    fit_seconds = {row["head"]: round(row["fit_seconds"], 2) for row in summary["heads"]}
    print(result.table)
    print(json.dumps({
        "image_dir": image_dir, "backbone": backbone, "heads": list(config.heads), "images": images,
        "training_images": counts["train"] + counts["val"], "test_images": counts["test"],
        "classes": len(summary["class_names"]), "features_computed": summary["extraction"]["computed"],
        "wall_seconds": round(seconds, 1), "head_fit_seconds": fit_seconds,
        "sum_of_fits_seconds": round(sum(fit_seconds.values()), 1),
        "seconds_per_1000_images": round(1000 * seconds / images, 1),
        "linear_extrapolation_to_3000_images_seconds": round(3000 * seconds / images, 1),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(SHARED / "sign_language_digits"),
         sys.argv[2] if len(sys.argv) > 2 else "mobilenet_v2")
