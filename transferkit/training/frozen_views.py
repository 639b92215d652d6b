"""Fine-tuning the top blocks on the frozen blocks' activations, computed once per run.

``fine-tune-top`` trains only the top blocks, yet the live path runs the frozen lower blocks
forward again on every augmented image in every epoch. Measured on mobilenet_v2 at 224 px on a
2-core CPU: a training step on the whole model runs 36 images/s, the frozen part's forward pass
44 images/s, a training step on the top 4 blocks alone 160 images/s. So the frozen part is
most of an epoch's cost, and it is the same computation every epoch but for the augmentation.

Here it runs once: on ``views`` augmented passes over the training images (the same
augmentation as the live path, each pass freshly drawn) and once on the validation images.
Epoch ``e`` then trains the top blocks on pass ``e mod views``, in an order of its own.
The frozen layers are the same in both paths (BatchNormalization in inference mode: Keras 3
runs a non-trainable BN layer with its moving statistics), so what changes is only that the
augmentation repeats every ``views`` epochs instead of never.

Falls back to live images (and says why) where the cut cannot pay or cannot be made: every
block trains (``full-retrain``), a ``--distribute`` strategy (the workers shard live files),
a cut that more than one tensor crosses, or activations over :data:`MAX_BYTES`.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import numpy as np

from transferkit.config import TrainConfig
from transferkit.models.build import block_boundaries
from transferkit.models.registry import BackboneSpec
from transferkit.training.strategies import Phase

log = logging.getLogger("transferkit")

#: The largest activation store kept in memory (training views plus validation). mobilenet_v2's
#: cut (7 x 7 x 160 floats, 31 KB) fits 4 views of about 16,000 images; resnet50's (14 x 14 x
#: 1,024, 800 KB) about 600: larger sets train on live images.
MAX_BYTES = 2 << 30


def split_at(model, cut_layer):
    """``(frozen, top)``: two models on ``model``'s layers, cut at ``cut_layer``'s output.

    ``frozen`` maps the model's input to that tensor, ``top`` maps it to the model's output, and
    training ``top`` trains the layers of ``model``. Returns None (with the reason logged) when
    another tensor of the lower part is used above the cut (a skip connection across it).
    """
    import keras

    cut = cut_layer.output
    try:
        top = keras.Model(cut, model.output, name=f"{model.name}_top")
    except ValueError as exc:  # Keras: "Graph disconnected" - the top needs another lower tensor
        log.info("Fine-tuning on live images: the top blocks also read a tensor from below '%s' (%s).",
                 cut_layer.name, str(exc).splitlines()[0][:160])
        return None
    return keras.Model(model.input, cut, name=f"{model.name}_frozen"), top


def store_bytes(cut_layer, num_train: int, num_val: int, views: int) -> int:
    """Bytes the activations of ``views`` passes over the training images and one over the
    validation images take (float32)."""
    return 4 * math.prod(cut_layer.output.shape[1:]) * (views * num_train + num_val)


def activations(frozen, dataset, passes: int, *, verbose: int, what: str) -> list[tuple[np.ndarray, ...]]:
    """Run ``frozen`` over ``passes`` iterations of ``dataset`` (batches of ``(images, labels,
    ...)``); each pass draws new augmentations (the dataset re-randomises on every iteration).

    Returns one ``(activations, labels, ...)`` tuple of arrays per pass, in the pass's order.
    """
    import keras

    from transferkit.progress import keras_verbose

    steps = int(dataset.cardinality())
    bar = keras.utils.Progbar(passes * steps if steps > 0 else None, unit_name="batch",
                              verbose=keras_verbose(1 if verbose >= 2 else (2 if verbose else 0)))
    started = time.perf_counter()
    result = []
    for _ in range(passes):
        columns: list[list[np.ndarray]] = []
        for batch in dataset:
            images, rest = batch[0], batch[1:]
            outputs = [frozen.predict_on_batch(images), *(np.asarray(t) for t in rest)]
            columns = columns or [[] for _ in outputs]
            for column, value in zip(columns, outputs, strict=True):
                column.append(value)
            bar.add(1)
        result.append(tuple(np.concatenate(column) for column in columns))
    if verbose:
        log.info("Frozen blocks: %s in %.0f s (computed once; the epochs train the top blocks on them).",
                 what, time.perf_counter() - started)
    return result


@functools.cache
def _views_dataset():
    import keras

    class FrozenViews(keras.utils.PyDataset):
        """Batches of cached activations for ``fit``: epoch ``e`` reads pass ``e mod len(passes)``
        in an order drawn from ``(seed, e)``, so a resumed run sees what the first one would have.

        The epoch is set by :meth:`callback` (Keras calls it before the epoch's first batch);
        NumPy indexing here rather than a ``tf.data`` pipeline: a tensor of the whole store
        would be copied into the dataset's graph, which cannot exceed 2 GB.
        """

        def __init__(self, passes: list[tuple[np.ndarray, ...]], batch_size: int, *, seed: int, shuffle: bool):
            super().__init__()
            self.passes, self.batch_size, self.seed, self.shuffle = passes, batch_size, seed, shuffle
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.columns = self.passes[epoch % len(self.passes)]
            size = len(self.columns[0])
            self.order = (np.random.default_rng([self.seed, epoch]).permutation(size) if self.shuffle
                          else np.arange(size))

        @property
        def num_batches(self):
            return math.ceil(len(self.order) / self.batch_size)

        def __len__(self):
            return self.num_batches

        def __getitem__(self, index):
            rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
            return tuple(column[rows] for column in self.columns)

        def callback(self):
            """A Keras callback that points this dataset at each epoch as it begins."""
            dataset = self

            class SetEpoch(keras.callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    dataset.set_epoch(epoch)

            return SetEpoch()

    return FrozenViews


def views_dataset(passes: list[tuple[np.ndarray, ...]], batch_size: int, *, seed: int, shuffle: bool):
    """A ``keras.utils.PyDataset`` over cached passes (see ``FrozenViews`` above)."""
    return _views_dataset()(passes, batch_size, seed=seed, shuffle=shuffle)


def fit_inputs(config: TrainConfig, spec: BackboneSpec, tuned, tuned_backbone, phase: Phase, train_data, val_data,
               num_train: int, num_val: int, batch: int, verbose: int):
    """What the fine-tune phase fits: the top blocks on activations the frozen blocks computed once
    (``--fine-tune-views``), or the whole model on live images.

    Returns ``(model to fit, training data, validation data, extra callbacks, info for metrics.json)``.
    """
    live = (tuned, train_data, val_data, [], {"views": 0})
    boundaries = block_boundaries(spec, tuned_backbone)
    if not config.fine_tune_views or phase.unfreeze_blocks >= len(boundaries):
        return live
    if config.distribute != "none":
        log.info("Fine-tuning on live images: each --distribute worker reads its own shard of the files.")
        return live
    cut_layer = tuned_backbone.layers[boundaries[-phase.unfreeze_blocks - 1][1]]
    size = store_bytes(cut_layer, num_train, num_val, config.fine_tune_views)
    if size > MAX_BYTES:
        log.info("Fine-tuning on live images: %d views of the frozen blocks' output would take %.1f GB of memory "
                 "(more than %.1f GB).", config.fine_tune_views, size / 1e9, MAX_BYTES / 1e9)
        return live
    split = split_at(tuned, cut_layer)
    if split is None:
        return live
    frozen, top = split
    started = time.perf_counter()
    passes = activations(frozen, train_data, config.fine_tune_views, verbose=verbose,
                         what=f"{config.fine_tune_views} augmented views of {num_train} training images")
    fit_train = views_dataset(passes, batch, seed=config.seed, shuffle=True)
    fit_val = None
    if val_data is not None:
        fit_val = views_dataset(activations(frozen, val_data, 1, verbose=verbose, what=f"{num_val} validation images"),
                                batch, seed=config.seed, shuffle=False)
    info = {"views": config.fine_tune_views, "cut": cut_layer.name, "bytes": size,
            "seconds": round(time.perf_counter() - started, 2)}
    return top, fit_train, fit_val, [fit_train.callback()], info
