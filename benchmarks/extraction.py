"""Feature extraction speed, measured as ratios in one run (prints; asserts nothing).

1. End-to-end extraction (read, decode, resize, forward pass, cache write) against the
   backbone's own forward pass on the same images already decoded into a tensor.
2. A re-run on the unchanged folder against the first run.
3. A freeze-all training run (extraction + softmax head) against one extraction pass.

Usage (real weights via a Keras home whose ``models`` is ../shared/imagenet-weights):
    KERAS_HOME=/tmp/kh python benchmarks/extraction.py ../shared/datasets/sign_language_digits mobilenet_v2
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(image_dir: str, backbone: str, batch_size: int = 32) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    from transferkit.cache import FeatureCache, FeatureSpec, extract_features
    from transferkit.config import TrainConfig
    from transferkit.data.scan import load_image, scan_folder
    from transferkit.models.registry import get_backbone
    from transferkit.models.weights import load_backbone, resolve_weights
    from transferkit.training.run import train

    spec = get_backbone(backbone)
    folder = scan_folder(image_dir)
    paths = [folder.abs_path(p) for p in folder.paths]
    model = load_backbone(spec, resolve_weights(spec, "imagenet"), spec.input_size)
    feature_spec = FeatureSpec.for_model(spec, model)

    # 1. The forward pass alone on images decoded beforehand, against end-to-end extraction of the
    # same images into an empty cache. Interleaved rounds, median ratio: these VMs' speed drifts
    # by up to 2x from one minute to the next, which would swamp one measurement of each.
    sample_paths = paths[:512]
    sample = np.stack([load_image(p, spec.input_size) for p in sample_paths]).astype("float32")
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    forward(sample[:batch_size])  # trace once
    forward_rates, extraction_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # Both sides are measured traced: extraction traces the model once per process (about 1 s,
        # see whole_folder_images_per_second for a run that includes it).
        extract_features(model, sample_paths[:batch_size], FeatureCache(Path(tmp) / "warm-up", feature_spec),
                         batch_size=batch_size, verbose=0)
        for round_index in range(3):
            start = time.perf_counter()
            for i in range(0, len(sample), batch_size):
                forward(sample[i:i + batch_size]).numpy()
            forward_rates.append(len(sample) / (time.perf_counter() - start))
            cache = FeatureCache(Path(tmp) / f"sample{round_index}", feature_spec)
            start = time.perf_counter()
            extract_features(model, sample_paths, cache, batch_size=batch_size, verbose=0)
            extraction_rates.append(len(sample) / (time.perf_counter() - start))
    ratios = [e / f for e, f in zip(extraction_rates, forward_rates, strict=True)]

    with tempfile.TemporaryDirectory() as tmp:
        # 2. The whole folder into an empty cache, then again unchanged.
        start = time.perf_counter()
        first = extract_features(model, paths, FeatureCache(Path(tmp) / "cache", feature_spec),
                                 batch_size=batch_size, verbose=0)
        first_seconds = time.perf_counter() - start
        start = time.perf_counter()
        extract_features(model, paths, FeatureCache(Path(tmp) / "cache", feature_spec), batch_size=batch_size,
                         verbose=0)
        rerun_seconds = time.perf_counter() - start

        # 3. One whole extraction pass as `transferkit extract` makes it (scan, build the backbone,
        # extract into an empty cache), against freeze-all from an empty cache: the same pass
        # plus the softmax head (at most 20 epochs, as the issue states) and writing the run.
        keras.backend.clear_session()
        start = time.perf_counter()
        pass_folder = scan_folder(image_dir)
        # Flip-averaged, as train's freeze-all extracts by default: the ratio below is train's overhead.
        pass_model = load_backbone(spec, resolve_weights(spec, "imagenet"), spec.input_size, mirror=True)
        pass_spec = FeatureSpec.for_model(spec, pass_model)
        extract_features(pass_model, [pass_folder.abs_path(p) for p in pass_folder.paths],
                         FeatureCache(Path(tmp) / "cache-pass", pass_spec), batch_size=batch_size, verbose=0,
                         keep_vectors=False)
        pass_seconds = time.perf_counter() - start
        config = TrainConfig(image_dir, str(Path(tmp) / "run"), backbone=backbone,
                             cache_dir=str(Path(tmp) / "cache-train"))
        keras.backend.clear_session()
        start = time.perf_counter()
        metrics = train(config, verbose=0).metrics
        train_seconds = time.perf_counter() - start

    print(json.dumps({
        "machine": f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, Keras {keras.__version__}",
        "image_dir": image_dir, "backbone": backbone, "images": len(paths),
        "forward_pass_images_per_second": [round(r, 1) for r in forward_rates],
        "extraction_images_per_second": [round(r, 1) for r in extraction_rates],
        "extraction_over_forward_pass_median": round(float(np.median(ratios)), 3),
        "whole_folder_images_per_second": round(len(paths) / first_seconds, 1),
        "first_run_seconds": round(first_seconds, 2), "rerun_seconds": round(rerun_seconds, 3),
        "rerun_over_first_run": round(rerun_seconds / first_seconds, 4),
        "extraction_pass_seconds": round(pass_seconds, 2),
        "freeze_all_train_seconds": round(train_seconds, 2),
        "freeze_all_head_seconds": metrics["timings"]["fit_seconds"],
        "freeze_all_over_extraction_pass": round(train_seconds / pass_seconds, 3),
        # The measure: extract + train the head + write the model and metrics. The report
        # (feature map, Grad-CAM of the worst mistakes, plots) comes after, and is counted above.
        "freeze_all_before_report_seconds": metrics["timings"]["total_seconds"],
        "freeze_all_before_report_over_extraction_pass": round(metrics["timings"]["total_seconds"] / pass_seconds, 3),
        "computed_first_run": first.num_computed,
    }, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
