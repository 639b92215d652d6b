"""Wall time of ``transferkit compare`` with its five default heads on 3,000 cached images (issue 5's target:
under a minute on a 2-core CPU).

The 3,000 images: all 2,062 photos of ``../shared/datasets/sign_language_digits`` (10 classes, 100x100
JPEG), copied byte for byte, plus 938 new images derived from as many of those photos (drawn at
random with seed 0, each at most once: 81 to 107 per class): each is mirrored left-right,
cropped to its central 92% (4% off every side, 92x92 px) and re-encoded as JPEG at quality 90, and
saved beside its original as ``NAME_mirror.jpg`` in the same class folder. Their bytes, and so
their cache keys, differ from every original: the backbone extracts them like any new image. (An
original and its derived copy can fall into different splits, so the accuracies printed are
somewhat optimistic; this script measures time.)

Steps: build that folder once in a temporary directory; extract its features once into the cache
(a one-head comparison, not timed); then time, end to end, a comparison with the default heads
(softmax, linear-svm, logreg, ridge, knn, with their grid searches): scan, cache look-up, every
head's training and scoring, and every file of OUTPUT_DIR (table, plots, feature map, report).
Prints the table, the wall time and its ratio to the 60 s target, each head's fit time, the load
average before and after (the machine is shared). Asserts nothing.

Usage (real ImageNet weights via a Keras home whose ``models`` is ../shared/imagenet-weights):
    KERAS_HOME=/tmp/kh python benchmarks/compare.py [--backbone mobilenet_v2] [--cache-dir DIR]
        [--source ../shared/datasets/sign_language_digits] [--num-images 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TARGET_SECONDS = 60.0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def build_folder(source: Path, target: Path, num_images: int, seed: int = 0) -> dict[str, int]:
    """Copy every image of ``source`` to ``target`` and add mirrored, cropped JPEG copies up to ``num_images``."""
    import numpy as np
    from PIL import Image, ImageOps

    originals = sorted(p for p in source.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    extra = num_images - len(originals)
    if not 0 <= extra <= len(originals):
        raise SystemExit(f"{source} has {len(originals)} images; cannot make {num_images} with one derived copy each.")
    for path in originals:
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.parent.name / path.name)
    chosen = np.random.default_rng(seed).choice(len(originals), size=extra, replace=False)
    for index in sorted(chosen):
        path = originals[index]
        with Image.open(path) as img:
            img = ImageOps.mirror(ImageOps.exif_transpose(img).convert("RGB"))
            w, h = img.size
            dx, dy = round(0.04 * w), round(0.04 * h)
            img.crop((dx, dy, w - dx, h - dy)).save(target / path.parent.name / f"{path.stem}_mirror.jpg",
                                                    format="JPEG", quality=90)
    return {"originals": len(originals), "derived": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(SHARED / "sign_language_digits"))
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: transferkit's)")
    args = parser.parse_args()

    from transferkit.heads.compare import CompareConfig, prepare_comparison, run_comparison
    from transferkit.runtime import start_tensorflow

    start_tensorflow()
    with tempfile.TemporaryDirectory() as tmp:
        image_dir = Path(tmp) / "images"
        made = build_folder(Path(args.source), image_dir, args.num_images)
        warm_started = time.perf_counter()
        warm = CompareConfig(str(image_dir), str(Path(tmp) / "warm"), backbone=args.backbone, heads=("ridge",),
                             search=False, cache_dir=args.cache_dir)
        extraction = run_comparison(prepare_comparison(warm), verbose=0).summary["extraction"]  # not timed
        warm_seconds = time.perf_counter() - warm_started

        load_before = os.getloadavg()
        started = time.perf_counter()
        config = CompareConfig(str(image_dir), str(Path(tmp) / "timed"), backbone=args.backbone,
                               cache_dir=args.cache_dir)
        result = run_comparison(prepare_comparison(config), verbose=0)
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()
    summary = result.summary
    counts = summary["num_images"]
    fit_seconds = {row["head"]: round(row["fit_seconds"], 2) for row in summary["heads"]}
    print(result.table)
    print(f"Verdict: {result.verdict.text}")
    print(json.dumps({
        "source": args.source, "images": made, "backbone": args.backbone, "heads": list(config.heads),
        "images_used": counts["train"] + counts["val"] + counts["test"], "skipped": counts["skipped"],
        "training_images": counts["train"] + counts["val"], "test_images": counts["test"],
        "classes": len(summary["class_names"]),
        "warm_up_extraction": {**extraction, "wall_seconds": round(warm_seconds, 1)},
        "timed_run_features_computed": summary["extraction"]["computed"],
        "wall_seconds": round(seconds, 1),
        "features_training_scoring_seconds": summary["total_seconds"],
        "scan_files_plots_report_seconds": round(seconds - summary["total_seconds"], 1),
        "head_fit_seconds": fit_seconds, "sum_of_fits_seconds": round(sum(fit_seconds.values()), 1),
        "target_seconds": TARGET_SECONDS, "ratio_to_target": round(seconds / TARGET_SECONDS, 2),
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
