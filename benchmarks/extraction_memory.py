"""Peak memory of `transferkit extract` as the folder grows, as a ratio in one run (prints only).

Writes synthetic folders of 1,000 and 20,000 images, extracts each in a fresh process with the
tiny test backbone (what grows with the folder is transferkit's bookkeeping, not the model), and
prints each process's peak resident memory and the ratio. The issue's target: at most ~1.10.

Usage:
    python benchmarks/extraction_memory.py [SMALL LARGE]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys
from click.testing import CliRunner
from transferkit.cli import main
result = CliRunner().invoke(main, ["extract", sys.argv[1], "--backbone", "tiny_test", "--weights", "none",
                                   "--image-size", "32", "--cache-dir", sys.argv[2], "-q"])
assert result.exit_code == 0, result.output
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(image_dir: Path, cache_dir: Path) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(image_dir), str(cache_dir)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def main(small: int = 1_000, large: int = 20_000) -> None:
    from transferkit.testing import make_image_folder

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (small, large):
            folder = make_image_folder(Path(tmp) / f"f{count}", num_classes=10, images_per_class=count // 10,
                                       image_size=32)
            results[count] = peak_rss_mb(folder, Path(tmp) / f"cache{count}")
    print(json.dumps({"images": [small, large], "peak_rss_mb": [round(results[small], 1), round(results[large], 1)],
                      "large_over_small": round(results[large] / results[small], 3)}, indent=2))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
