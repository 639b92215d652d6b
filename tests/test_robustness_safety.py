"""Robustness, safety: nothing unsafe is loaded or run, paths from files stay inside their folder, and the
image scanner and recipe loader survive fuzzing with only clear errors.

What reads paths or code from files, and the decision for each:

* ``splits.csv`` (:func:`transferkit.data.scan.read_splits_csv`) holds paths relative to an image folder and may
  come from someone else's run: absolute paths, drive letters and ``..`` are refused.
* Recipes and ``config.yaml`` name folders (``image_dir``, ``output_dir``, ``cache_dir``): those are the
  user's own choices, exactly like the command-line flags they stand for, so any folder is allowed. They
  load with ``yaml.safe_load`` (no Python objects); unknown keys and wrong types fail.
* Image folders may contain symlinks, followed on purpose; links back to a containing folder are loops
  and are ignored (tests/test_robustness_input.py).
* Cache shards are found by pattern and named by their own SHA-256; nothing in a cache names a path
  that is then written to.
* ``model.keras`` loads with Keras' safe mode (no Lambda code); scikit-learn heads load with skops, and
  untrusted types need ``trust=True`` (tests/heads/test_heads.py).
* Nothing runs a shell.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transferkit.config import TrainConfig, config_from_dict, load_settings
from transferkit.data.images import unreadable_reason
from transferkit.data.scan import load_image, read_splits_csv, scan_folder
from transferkit.errors import ArgumentError, DataError, InputError, TransferkitError
from transferkit.testing import make_image_folder

PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------ paths from files


@pytest.mark.parametrize("rel", ["../outside.png", "cat/../../outside.png", "/etc/passwd", "C:/Windows/x.png",
                                 "\\\\server\\share\\x.png", "..\\outside.png", ""])
def test_splits_csv_paths_cannot_leave_the_image_folder(tmp_path, rel):
    path = tmp_path / "splits.csv"
    path.write_text(f"path,label,class_name,split\ncat/1.png,0,cat,train\n\"{rel}\",0,cat,test\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: path .* leaves the image folder"):
        read_splits_csv(path, root=tmp_path / "photos")


def test_splits_csv_keeps_ordinary_relative_paths(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("path,label,class_name,split\ncat/a..b.png,0,cat,train\ndog/x/.../y.png,1,dog,val\n",
                    encoding="utf-8")
    assert read_splits_csv(path).paths == ("cat/a..b.png", "dog/x/.../y.png")


# ------------------------------------------------------------------------------------ nothing executes


def test_no_shell_anywhere_in_the_package():
    """No os.system/os.popen, no shell=True: file names never pass through a shell."""
    found = []
    for source in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                    found.append(f"{source.name}:{node.lineno} {name}")
                for keyword in node.keywords:
                    if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                                       and keyword.value.value is False):
                        found.append(f"{source.name}:{node.lineno} shell=")
    assert found == []


def test_a_recipe_cannot_build_python_objects(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"is not valid YAML"):
        load_settings(recipe)
    assert not marker.exists()


def test_a_model_with_code_inside_is_refused(tmp_path):
    import keras

    from transferkit.serving import runs

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keras.Model(inputs, outputs).save(run_dir / runs.MODEL_FILE)
    runs.write_labels(run_dir / runs.LABELS_FILE, ["a", "b", "c", "d"])
    with pytest.raises(InputError, match=r"Cannot load model .*model\.keras.*Lambda"):
        runs.load_run(run_dir)


# ------------------------------------------------------------------------------------ fuzz: images


def _seed_images() -> list[tuple[str, bytes]]:
    """Small valid files of every format, to mutate (random bytes alone rarely get past the header)."""
    import io

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    out = []
    for ext, fmt, options in ((".jpg", "JPEG", {"quality": 80}), (".png", "PNG", {}), (".gif", "GIF", {}),
                              (".bmp", "BMP", {}), (".webp", "WEBP", {}), (".tif", "TIFF", {}),
                              (".png", "PNG", {"transparency": 0})):
        img = Image.fromarray(pixels)
        if fmt == "GIF" or "transparency" in options:
            img = img.convert("P")
        if fmt == "JPEG":
            exif = img.getexif()
            exif[0x0112] = 6
            options = {**options, "exif": exif}
        buffer = io.BytesIO()
        img.save(buffer, fmt, **options)
        out.append((ext, buffer.getvalue()))
    return out


SEEDS = _seed_images()


@st.composite
def mutated_image(draw) -> tuple[str, bytes]:
    """A valid image file with a few bytes changed, cut short or spliced; sometimes pure noise."""
    ext, data = draw(st.sampled_from(SEEDS))
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 8] = bytes(min(8, len(data) - at))
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        data = bytearray(draw(st.binary(max_size=64)))
    return ext, bytes(data)


@pytest.fixture
def small_pixel_limit(monkeypatch):
    # A mutated header can declare millions of pixels; a lower limit keeps fuzzing fast and reaches the
    # decompression-bomb path often.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning", "ignore::UserWarning")
@FUZZ
@given(image=mutated_image())
def test_fuzz_decoder_returns_pixels_or_a_value_error(small_pixel_limit, image):
    ext, data = image
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{ext}"
        path.write_bytes(data)
        reason = unreadable_reason(path)
        assert reason is None or isinstance(reason, str)
        try:
            arr = load_image(path, 16)
        except ValueError as exc:
            assert str(exc).startswith("Cannot decode image")
        else:
            assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


_NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1,
                max_size=12).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning", "ignore::UserWarning")
@FUZZ
@given(entries=st.lists(st.tuples(st.sampled_from(["cat", "dog", "cat/deep", "Dog", ".hidden", "train", "val"]),
                                  _NAME, st.sampled_from([".jpg", ".PNG", ".gif", ".webp", ".tif", ".bmp", ".txt", ""]),
                                  mutated_image()), max_size=8),
       links=st.lists(st.tuples(st.sampled_from(["cat", "dog", "train"]), _NAME,
                                st.sampled_from([".", "..", "../..", "../dog", "nowhere"])), max_size=2))
def test_fuzz_scanner_returns_a_folder_or_a_data_error(small_pixel_limit, entries, links):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        for folder, name, ext, (_, data) in entries:
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / (name + ext)).write_bytes(data)
        for folder, name, target in links:
            (root / folder).mkdir(parents=True, exist_ok=True)
            link = root / folder / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(target, target_is_directory=True)
        try:
            folder = scan_folder(root)
        except DataError:
            return
        assert len(folder.paths) == len(set(folder.paths)) == len(folder.labels) == len(folder.splits)
        assert all(not p.startswith("/") and ".." not in p.split("/") for p in folder.paths)
        for rel in folder.paths:
            try:
                load_image(folder.abs_path(rel), 8)
            except ValueError:
                pass


# ------------------------------------------------------------------------------------ fuzz: recipes

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
_YAML_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**320)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
_YAML_VALUES = st.recursive(_YAML_SCALARS, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_KEYS = st.sampled_from(FIELDS) | st.sampled_from([f.replace("_", "-") for f in FIELDS]) | st.text(max_size=10)


@FUZZ
@given(settings_=st.dictionaries(_KEYS, _YAML_VALUES, max_size=8), complete=st.booleans())
def test_fuzz_config_from_dict_gives_a_config_or_an_input_error(settings_, complete):
    if complete:
        settings_ = {"image_dir": "photos", "output_dir": "runs/a", **settings_}
    try:
        config = config_from_dict(settings_, source="the fuzz")
    except InputError as exc:
        # A recipe's key or type names its source; a value out of range names the argument (Keras style).
        assert "the fuzz" in str(exc) or isinstance(exc, ArgumentError) and f"Received: {exc.argument}=" in str(exc)
        return
    assert isinstance(config, TrainConfig)
    for name in ("learning_rate", "val_fraction", "test_fraction", "dropout"):
        assert math.isfinite(getattr(config, name))


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
       raw=st.binary(max_size=60), as_bytes=st.booleans())
def test_fuzz_recipe_files_load_or_fail_with_an_input_error(text, raw, as_bytes):
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        if as_bytes:
            path.write_bytes(raw)
        else:
            path.write_text(text, encoding="utf-8")
        try:
            settings_ = load_settings(path)
        except InputError as exc:
            assert str(path) in str(exc)
            return
        assert isinstance(settings_, dict) and set(settings_) <= set(FIELDS)
        # What loads writes back and loads the same (no object survives safe_dump/safe_load differently).
        path.write_text(yaml.safe_dump(settings_), encoding="utf-8")
        assert load_settings(path) == settings_ or any(isinstance(v, float) and math.isnan(v)
                                                       for v in settings_.values())


@FUZZ
@given(settings_=st.dictionaries(st.sampled_from(FIELDS), _YAML_VALUES, max_size=6))
def test_fuzz_recipes_written_as_yaml(settings_):
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        try:
            path.write_text(yaml.safe_dump(settings_), encoding="utf-8")
        except yaml.YAMLError:
            return
        try:
            load_settings(path)
        except TransferkitError as exc:
            assert isinstance(exc, InputError)


def test_fuzzed_folders_are_real_folders(tmp_path):
    """The fuzzers' building blocks decode when not mutated (so the fuzz reaches the decoders)."""
    for ext, data in SEEDS:
        (tmp_path / f"seed{ext}").write_bytes(data)
        assert load_image(tmp_path / f"seed{ext}", 8).shape == (8, 8, 3)
    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=2)
    assert len(scan_folder(root).paths) == 4
