"""BottleneckFeatures: transferkit features inside scikit-learn code."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from transferkit.errors import DataError
from transferkit.heads.estimator import BottleneckFeatures


def test_bottleneck_features_is_a_scikit_learn_transformer(tmp_path):
    from transferkit.testing import make_image_folder

    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=6, image_size=32)
    paths = sorted(str(p) for p in root.glob("*/*.png"))
    labels = np.array([0 if "class_0" in p else 1 for p in paths])
    transformer = BottleneckFeatures(backbone="tiny_test", weights="none", image_size=32,
                                     cache_dir=tmp_path / "cache")
    assert clone(transformer).get_params() == transformer.get_params()
    assert not hasattr(transformer, "model_")  # __init__ only stores
    assert transformer.fit(paths) is transformer
    vectors = transformer.transform(paths)
    assert vectors.shape == (12, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(transformer.transform(paths[:3]), vectors[:3], atol=1e-6)  # from the cache
    assert list(transformer.get_feature_names_out())[:2] == ["bottleneckfeatures0", "bottleneckfeatures1"]
    assert transformer.identity(["class_0", "class_1"])["weights_id"] == transformer.weights_id_

    model = Pipeline([("features", clone(transformer)), ("clf", LogisticRegression())]).fit(paths, labels)
    assert model.predict(paths).shape == (12,)

    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"1 of 2 images could not be used: .*broken\.png"):
        transformer.transform([paths[0], tmp_path / "broken.png"])


def test_transform_takes_a_folder_or_a_manifest_whole_labelled_or_not(tmp_path):
    from transferkit.data.scan import scan_folder
    from transferkit.testing import make_image_folder

    root = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=4, image_size=32)
    transformer = BottleneckFeatures(backbone="tiny_test", weights="none", image_size=32).fit()
    folder = scan_folder(root)
    expected = transformer.transform([folder.abs_path(p) for p in folder.paths])
    np.testing.assert_allclose(transformer.transform(root), expected, atol=1e-6)
    manifest = tmp_path / "photos.csv"
    manifest.write_text("path,label\n" + "".join(f"photos/{p},{p.split('/')[0]}\n" for p in folder.paths))
    np.testing.assert_allclose(transformer.transform(manifest), expected, atol=1e-6)
    np.testing.assert_allclose(transformer.transform(root / "class_1"), expected[4:], atol=1e-6)  # no classes
