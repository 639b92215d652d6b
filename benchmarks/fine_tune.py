"""fine-tune-top's accuracy and wall time, over seeds, against the live-image path and the record.

For a labelled folder, a backbone and seeds: runs ``transferkit.train`` with ``--strategy
fine-tune-top`` and its defaults (the top blocks train on ``--fine-tune-views`` cached views of the
frozen blocks' output), and prints per seed the test accuracy, the fine-tune phase's wall time
(the frozen blocks' views plus every epoch, validation included: ``elapsed_seconds`` of the last
epoch in ``history.csv``) and the epoch at which validation accuracy peaked. Features are cached
by a first run, so extraction is not part of any time. ``--live`` also runs each seed on live
images (``fine_tune_views=0``, the path before views), so both are timed in the same session on
the same machine; the ratio is printed. Prints measurements; asserts nothing. Run it alone: the
2-core VM's timings double when anything else runs.

Usage (real ImageNet weights via a Keras home whose ``models`` is ../shared/imagenet-weights):
    KERAS_HOME=/tmp/kh python benchmarks/fine_tune.py ../shared/datasets/sign_language_digits mobilenet_v2 \
        [--seeds 0-4] [--live] val_fraction=0.1 test_fraction=0.2 [KEY=VALUE ...]
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import yaml

#: The record this path must halve: sign digits, seed 0, mobilenet_v2, 20 epochs on live images
#: (README, Strategies, measured 2026-11-23): test accuracy 0.986 in 652 s.
RECORD = (0.986, 652.0)


def phase_figures(run_dir: Path) -> tuple[float, int, float]:
    """``(wall seconds, best epoch, best validation accuracy)`` of the fine-tune phase."""
    with open(run_dir / "history.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["phase"] == "fine-tune"]
    best = max(rows, key=lambda row: float(row["val_accuracy"]))
    return float(rows[-1]["elapsed_seconds"]), int(best["epoch"]) + 1, float(best["val_accuracy"])


def main(image_dir: str, backbone: str, seeds: list[int], live: bool, **overrides) -> None:
    from transferkit.config import TrainConfig
    from transferkit.training.run import train

    arms = [("views", {}), *([("live", {"fine_tune_views": 0})] if live else [])]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in arms}
    print(f"sign-digit record (live images, seed 0; other folders: compare with --live): accuracy {RECORD[0]:.3f} "
          f"in {RECORD[1]:.0f} s")
    print("arm    seed  test acc  fine-tune s  best val epoch (acc)  views")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = str(Path(tmp) / "cache")
        for seed in seeds:
            for name, arm in arms:
                run_dir = Path(tmp) / f"{name}{seed}"
                config = TrainConfig(image_dir, str(run_dir), backbone=backbone, seed=seed, strategy="fine-tune-top",
                                     cache_dir=cache_dir).replace(**{**overrides, **arm})
                metrics = train(config, verbose=0).metrics
                seconds, best_epoch, best_val = phase_figures(run_dir)
                accuracy = metrics["test"]["accuracy"]
                results[name].append((accuracy, seconds))
                views = metrics["fine_tune"]["frozen_views"]
                print(f"{name:6} {seed:4}  {accuracy:8.3f}  {seconds:11.0f}  {best_epoch:5} ({best_val:.3f})"
                      f"        {views['views']} ({views.get('seconds', 0):.0f} s)", flush=True)
    for name, rows in results.items():
        accuracy = sum(a for a, _ in rows) / len(rows)
        seconds = sum(s for _, s in rows) / len(rows)
        print(f"{name}: mean accuracy {accuracy:.3f}, mean wall time {seconds:.0f} s "
              f"({seconds / RECORD[1]:.2f} of the sign-digit record's {RECORD[1]:.0f} s)")
    if live:
        ratios = [v[1] / w[1] for v, w in zip(results["views"], results["live"], strict=True)]
        print("views / live wall time, same seed, same session: " + ", ".join(f"{r:.2f}" for r in ratios))


def _seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


if __name__ == "__main__":
    args = sys.argv[1:]
    seeds, live = [0], "--live" in args
    args = [a for a in args if a != "--live"]
    if "--seeds" in args:
        at = args.index("--seeds")
        seeds = _seeds(args[at + 1])
        del args[at:at + 2]
    positional = [a for a in args if "=" not in a]
    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args if "=" in a)}
    main(*positional, seeds=seeds, live=live, **overrides)
