"""The fine-tune phase: backbone layers train with the head, on live images, with Keras ``fit``.

What this module guarantees, because Keras users get each of these wrong by hand:

- Only the layers of the unfrozen blocks train; BatchNormalization layers stay frozen (and so in
  inference mode: Keras 3 runs a non-trainable BN layer with its moving statistics) unless
  ``--train-bn``; the model is compiled after ``trainable`` is set, in the same function.
- Discriminative learning rates: one optimizer, each variable's step scaled by its layer's
  multiplier (head 1, top block 0.1, deeper blocks 0.01 by default).
- Warm-up then cosine (or one-cycle) decay from Keras' own ``CosineDecay``.
- Resumable: ``BackupAndRestore`` checkpoints weights, optimizer and epoch every epoch; the best
  epoch's weights are kept by ``ModelCheckpoint`` and early stopping resumes with its counters.
  Every one of these files is written atomically (Keras writes them in place, so an interrupt
  inside a write left a file every later resume crashed on), and a damaged last backup falls
  back to the one before it.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.config import TrainConfig
from transferkit.models.build import block_boundaries
from transferkit.models.registry import BackboneSpec
from transferkit.progress import keras_verbose
from transferkit.runtime import XLA_ON_CPU_NOTE, xla_device
from transferkit.training.strategies import Phase, layer_rates

log = logging.getLogger("transferkit")

#: ``one-cycle`` warms up over this share of the steps, then anneals (fastai's ``pct_start``).
ONE_CYCLE_WARMUP_SHARE = 0.25


def set_trainable(backbone, spec: BackboneSpec, phase: Phase, train_bn: bool = False) -> dict[str, float]:
    """Freeze and unfreeze the backbone's layers for a phase; returns ``{layer name: rate multiplier}``
    of the layers that train.

    Call before ``compile`` (``compile`` fixes which weights the optimizer updates).
    """
    import keras

    backbone.trainable = True
    rates = layer_rates(block_boundaries(spec, backbone), len(backbone.layers), phase)
    trained = {}
    for layer, rate in zip(backbone.layers, rates, strict=True):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = rate is not None and (train_bn or not is_bn)
        if layer.trainable and layer.weights:
            trained[layer.name] = rate
    return trained


@functools.cache
def _layer_rate_adam():
    import keras

    class LayerRateAdam(keras.optimizers.Adam):
        """Adam whose step for each variable is scaled by its layer's rate multiplier.

        Keras has no per-layer learning rates (TensorFlow Addons' MultiOptimizer is gone), and
        scaling gradients would not scale Adam's steps; scaling the rate it is given does.
        """

        def __init__(self, layer_rates: dict[str, float], **kwargs):
            super().__init__(**kwargs)
            self.layer_rates = dict(layer_rates)

        def build(self, variables):
            super().build(variables)
            self._multipliers = [self.layer_rates.get(v.path.split("/")[0], 1.0) for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            multiplier = self._multipliers[self._get_variable_index(variable)]
            super().update_step(gradient, variable, learning_rate * multiplier)

        def get_config(self):
            return {**super().get_config(), "layer_rates": self.layer_rates}

    return LayerRateAdam


def make_optimizer(config: TrainConfig, layer_rates: dict[str, float], steps_per_epoch: int, epochs: int):
    """Adam with per-layer rates and the configured schedule (see :func:`make_schedule`)."""
    return _layer_rate_adam()(layer_rates, learning_rate=make_schedule(config, steps_per_epoch, epochs))


def make_schedule(config: TrainConfig, steps_per_epoch: int, epochs: int):
    """The fine-tune rate: a number (``constant``) or a Keras schedule: linear warm-up from 1/25 of
    the peak, then cosine decay to zero (``one-cycle`` warms up over a quarter of the steps)."""
    import keras

    total = max(1, steps_per_epoch * epochs)
    peak = config.fine_tune_learning_rate
    if config.schedule == "constant":
        rate = peak
    else:
        share = ONE_CYCLE_WARMUP_SHARE if config.schedule == "one-cycle" else config.warmup_epochs / epochs
        warmup = min(total - 1, round(total * share))
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=peak / 25 if warmup else peak, decay_steps=total - warmup, alpha=0.0,
            warmup_target=peak if warmup else None, warmup_steps=warmup)
    return rate


def fine_tune(model, config: TrainConfig, layer_rates: dict[str, float], train_data, val_data, *,
              steps_per_epoch: int, checkpoint_dir: Path, class_weight: dict | None = None,
              baseline: float | None = None, verbose: int = 1, extra_callbacks: list | None = None,
              elapsed_before: float = 0.0) -> tuple[list[dict], bool]:
    """Compile ``model`` for the fine-tune phase and fit it, resuming from ``checkpoint_dir``.

    On return the model holds the weights of its best epoch (lowest validation loss), if one
    beat ``baseline``; otherwise the caller keeps the weights it started from.

    Args:
        baseline: the validation loss to beat (the head phase's), or None.
        elapsed_before: seconds the phase spent before its first epoch (the frozen blocks'
            activations), counted in the history's ``elapsed_seconds``.

    Returns:
        ``(rows, improved)``: one dictionary per epoch run (``epoch``, ``loss``, ``accuracy``,
        ``val_loss``, ...), including epochs finished before an interruption, and whether an
        epoch beat ``baseline`` (the model then holds the best one).
    """
    import keras

    from transferkit.errors import TransferkitError
    from transferkit.serving import runs

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    history_path = checkpoint_dir / "history-fine-tune.csv"
    best_path = checkpoint_dir / "best.weights.h5"
    model.compile(optimizer=make_optimizer(config, layer_rates, steps_per_epoch, config.fine_tune_epochs),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=config.xla or False)
    _say_xla(config, model)
    # Restored before fit, so the history and early stopping below start from the epoch restored
    # (after a fallback to the previous backup, the epoch run again is not counted twice).
    callbacks_ = atomic_callbacks()
    backup = callbacks_.BackupAndRestore(str(checkpoint_dir / runs.BACKUP_DIR))
    backup.set_model(model)
    start = backup.restore()
    earlier = [row for row in read_history(history_path) if row["epoch"] < start]
    monitor = "val_loss" if val_data is not None else "loss"
    best_so_far = [row[monitor] for row in earlier if monitor in row] + (
        [baseline] if baseline is not None and val_data is not None else [])
    callbacks = [
        callbacks_.ModelCheckpoint(str(best_path), monitor=monitor, save_best_only=True, save_weights_only=True,
                                   initial_value_threshold=min(best_so_far, default=None)),
        _resumed_early_stopping(keras, monitor, config.fine_tune_patience, earlier),
        callbacks_.History(history_path, earlier, elapsed_before),
        *(extra_callbacks or []),
        *tensorboard_callbacks(config, checkpoint_dir, "fine-tune", resumed=start > 0),
        backup,  # last: its state file commits an epoch once the best weights and the history hold it
    ]
    model.fit(train_data, validation_data=val_data, epochs=config.fine_tune_epochs, class_weight=class_weight,
              callbacks=callbacks, verbose=keras_verbose(1 if verbose >= 2 else (2 if verbose else 0)),
              shuffle=False, initial_epoch=start)
    if best_path.is_file():
        try:
            model.load_weights(best_path)
        except Exception as exc:  # noqa: BLE001 - HDF5 and shape errors: a file changed by something else
            raise TransferkitError(f"The best fine-tune weights '{best_path}' cannot be read ({type(exc).__name__}). "
                                   "Train the run again with --overwrite.") from exc
    return read_history(history_path), best_path.is_file()


#: The names a backup's weights may have (nothing else is ever loaded from the backup folder).
_BACKUP_WEIGHTS = re.compile(r"(epoch-\d{1,6}|latest)\.weights\.h5")


@functools.cache
def atomic_callbacks():
    """Keras' checkpointing callbacks, writing every file atomically (defined on first use: Keras
    loads lazily). Attributes ``BackupAndRestore``, ``ModelCheckpoint`` and ``History``."""
    import types

    import keras

    from transferkit.serving import runs

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        """Keras' ``BackupAndRestore`` with crash-safe files.

        Keras overwrites ``latest.weights.h5`` in place, then ``training_metadata.json``: an
        interrupt inside the write (two quick Ctrl-Cs) leaves a file that every later resume
        crashes on. Here each epoch's weights go to a new ``epoch-N.weights.h5`` (temporary file,
        fsync, rename), then ``state.json`` (written the same way) names it as the latest and the
        one before it as the previous; only those two are kept. A latest that will not load falls
        back to the previous one with a warning. A folder of Keras' own callback resumes too.
        """

        def __init__(self, backup_dir: str):
            super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
            self._state_path = Path(backup_dir) / "state.json"
            self._latest: dict | None = None
            self._restored = False

        def on_train_begin(self, logs=None):
            if not self._restored:
                self.restore()

        def restore(self) -> int:
            """Load the newest loadable backup into the model; returns the epoch to start from."""
            self._restored = True
            candidates = self._candidates()
            if not candidates:
                return 0
            optimizer = self.model.optimizer
            if optimizer is not None and not optimizer.built:
                optimizer.build(self.model.trainable_variables)  # its variables are in the file too
            snapshot = [keras.ops.convert_to_numpy(v) for v in self.model.variables]
            folder = Path(self.backup_dir)
            for i, entry in enumerate(candidates):
                try:
                    self.model.load_weights(folder / entry["weights"])
                except Exception as exc:  # noqa: BLE001 - HDF5, OS and shape errors all mean a damaged file
                    then = (f"falling back to the previous one (epoch {candidates[i + 1]['epoch']})"
                            if i + 1 < len(candidates) else "no earlier one is left, so the phase starts again")
                    log.warning("WARNING: fine-tune backup '%s' is damaged (%s: %s); %s.", folder / entry["weights"],
                                type(exc).__name__, str(exc)[:120], then)
                    continue
                self._latest = entry
                self.model._initial_epoch = entry["epoch"]  # what Keras' own restore sets
                return entry["epoch"]
            for variable, value in zip(self.model.variables, snapshot, strict=True):
                variable.assign(value)  # undo whatever a damaged file loaded before it failed
            return 0

        def _candidates(self) -> list[dict]:
            """``[latest, previous]`` backups as ``{"epoch", "weights"}`` whose files exist, newest first."""
            folder = Path(self.backup_dir)
            state = _read_json(self._state_path)
            if state is None and (folder / "latest.weights.h5").is_file():  # Keras' own layout
                meta = _read_json(folder / "training_metadata.json")
                state = {"latest": {"epoch": meta.get("epoch") if isinstance(meta, dict) else None,
                                    "weights": "latest.weights.h5"}}
            entries = [state.get(key) for key in ("latest", "previous")] if isinstance(state, dict) else []
            return [{"epoch": entry["epoch"], "weights": entry["weights"]} for entry in entries
                    if isinstance(entry, dict) and type(entry.get("epoch")) is int and entry["epoch"] >= 0
                    and isinstance(entry.get("weights"), str) and _BACKUP_WEIGHTS.fullmatch(entry["weights"])
                    and (folder / entry["weights"]).is_file()]

        def _save_model(self):
            folder = Path(self.backup_dir)
            folder.mkdir(parents=True, exist_ok=True)
            latest = {"epoch": self._current_epoch, "weights": f"epoch-{self._current_epoch:04d}.weights.h5"}
            runs.save_weights(self.model, folder / latest["weights"])
            previous = self._latest if self._latest and self._latest["weights"] != latest["weights"] else None
            files.write_json(self._state_path, {"latest": latest, "previous": previous})
            self._latest = latest
            keep = {latest["weights"], previous and previous["weights"]}
            for old in folder.glob("epoch-*.weights.h5"):
                if old.name not in keep:
                    old.unlink(missing_ok=True)

    class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
        """``ModelCheckpoint(save_weights_only=True)`` writing each file atomically (Keras writes in place)."""

        def _save_model(self, epoch, batch, logs):
            filepath = self._get_file_path(epoch, batch, logs)
            if self._should_save_model(epoch, batch, logs, filepath):
                runs.save_weights(self.model, filepath)

    class AtomicHistory(keras.callbacks.Callback):
        """Keras' ``CSVLogger`` appends each row in place, so an interrupt can leave half a row; this
        rewrites the whole (small) file atomically at each epoch's end, in the same columns."""

        def __init__(self, path: Path, earlier: list[dict], elapsed_before: float = 0.0):
            super().__init__()
            self.path, self.rows, self.elapsed_before = Path(path), list(earlier), elapsed_before
            self.started = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            # Time to accuracy: each epoch's wall time (validation included) and the running total.
            seconds = time.perf_counter() - self.started
            elapsed = seconds + sum(row.get("seconds", 0.0) for row in self.rows) + self.elapsed_before
            self.rows.append({"epoch": epoch, **{key: float(value) for key, value in (logs or {}).items()},
                              "seconds": round(seconds, 2), "elapsed_seconds": round(elapsed, 2)})
            columns = ["epoch"] + sorted({key for row in self.rows for key in row} - {"epoch"})
            files.write_csv(self.path, columns, [[row.get(c, "") for c in columns] for row in self.rows])

    return types.SimpleNamespace(BackupAndRestore=AtomicBackupAndRestore, ModelCheckpoint=AtomicModelCheckpoint,
                                 History=AtomicHistory)


def _read_json(path: Path):
    """A small JSON file, or None when it is missing, damaged, too large or not a regular file (a FIFO
    named state.json would block a plain read forever)."""
    try:
        return json.loads(files.read_regular_bytes(path, max_bytes=1 << 16))
    except (OSError, ValueError):
        return None


def _say_xla(config: TrainConfig, model) -> None:
    """``--xla``, after ``compile``: say when Keras declined it (it does under op determinism and for
    layers XLA cannot compile), and warn on a CPU, before the first step.

    Honoured on a CPU rather than dropped: the flag was asked for by name, and the run says what
    it costs; ``metrics.json`` records what was used (``fine_tune.xla``, ``fine_tune.device``).
    """
    if not config.xla:
        return
    if not model.jit_compile:
        log.warning("WARNING: --xla: Keras compiled the fine-tune step without XLA (it does not with --deterministic, "
                    "or when a layer of the model cannot be compiled by XLA).")
    elif xla_device() == "CPU":
        log.warning("WARNING: --xla on a machine without a GPU or TPU: %s. Going on with XLA as asked; drop --xla "
                    "to train faster.", XLA_ON_CPU_NOTE)


def tensorboard_callbacks(config: TrainConfig, checkpoint_dir: Path, phase: str, *, resumed: bool = False) -> list:
    """``--tensorboard``: Keras' TensorBoard callback for one phase's fit, writing to
    ``RUN_DIR/checkpoints/logs/<phase>`` (``tensorboard --logdir RUN_DIR/checkpoints/logs`` shows
    every phase); no callback without the flag. The package was checked before any work
    (:func:`transferkit.runtime.check_optional_flags`).

    A phase that starts afresh (not ``resumed``) first removes the event files an earlier run
    in this folder wrote there (``--overwrite``), whose curves would otherwise mix with its own.
    """
    if not config.tensorboard:
        return []
    import keras

    log_dir = checkpoint_dir / "logs" / phase
    if not resumed:
        for old in log_dir.glob("*/events.out.tfevents.*"):  # Keras writes <phase>/train and <phase>/validation
            if old.is_file() and not old.is_symlink():
                old.unlink()
    return [keras.callbacks.TensorBoard(str(log_dir))]


def _resumed_early_stopping(keras, monitor: str, patience: int, earlier: list[dict]):
    """EarlyStopping whose counters continue from the epochs already run (Keras' resets on restart)."""

    class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if self.monitor_op is None:
                self._set_monitor_op()  # Keras sets it at the first epoch's end; the rows below need it now
            for row in earlier:
                value = row[monitor]
                if self._is_improvement(value, self.best):
                    self.best, self.best_epoch, self.wait = value, int(row["epoch"]), 0
                else:
                    self.wait += 1

    return ResumedEarlyStopping(monitor=monitor, mode="min", patience=patience or 10**9, restore_best_weights=False)


def read_history(path: Path) -> list[dict]:
    """Rows of a Keras ``CSVLogger`` file as dictionaries of numbers (empty when there is none)."""
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                rows.append({key: int(value) if key == "epoch" else float(value) for key, value in row.items()
                             if isinstance(key, str) and isinstance(value, str) and value})
    except (ValueError, TypeError, csv.Error) as exc:  # UnicodeDecodeError is a ValueError
        log.warning("WARNING: the fine-tune history '%s' is damaged after %d rows (%s); the rest is ignored.",
                    path, len(rows), type(exc).__name__)
    return [row for row in rows if "epoch" in row]


def mixed_precision_policy() -> tuple[str | None, str]:
    """The mixed-precision policy for this machine and why: float16 on a GPU, bfloat16 on a CPU
    with native bfloat16 instructions, none otherwise."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16", "float16 compute on the GPU, float32 weights and output layer"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "mixed_bfloat16", "bfloat16 compute on this CPU (it has bfloat16 instructions), float32 weights"
    return None, "no GPU and no bfloat16 CPU instructions: training in float32"


def steps_for(num_images: int, batch_size: int) -> int:
    return max(1, math.ceil(num_images / batch_size))


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """``--class-weight auto``: scikit-learn's "balanced" weights, ``n / (k * count)`` per class."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    result = dict.fromkeys(range(num_classes), 1.0)
    result.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return result


def fine_tune_phase(config: TrainConfig, spec: BackboneSpec, image_size: int, backbone, model, phase: Phase,
                    folder, labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, checkpoint_dir: Path,
                    class_weight: dict | None, distribution, verbose: int, baseline: float | None = None):
    """Phase 2: unfreeze the phase's blocks and train on live (augmented) images.

    The model is rebuilt under the mixed-precision policy and distribution strategy when asked
    (variables must be created inside both), with the head phase's weights copied in; the
    returned model is float32, uncompiled, and a plain functional model either way.

    Fine-tuning must earn its place: when no epoch beats ``baseline`` (the head phase's best
    validation loss, the same images through the same graph), the head phase's model is kept.
    If the phase fails (out of memory, interrupted), ``model`` is left with the head phase's weights.

    Returns:
        ``(model, history rows, info for metrics.json)``.
    """
    import keras

    from transferkit.data.augment import training_images
    from transferkit.models.build import build_backbone
    from transferkit.training import frozen_views
    from transferkit.training.distribute import shard_by_data, sync_weights, training_model

    policy, policy_note = (None, "")
    if config.mixed_precision:
        policy, policy_note = mixed_precision_policy()
        log.info("--mixed-precision: %s.", policy_note)
    batch = config.batch_size * distribution.num_replicas_in_sync
    train_data = shard_by_data(training_images(
        [folder.abs_path(folder.paths[i]) for i in train_idx], labels[train_idx], image_size, batch, config=config,
        shuffle=True, seed=config.seed, balanced=config.sampling == "balanced"))
    val_data = shard_by_data(training_images(
        [folder.abs_path(folder.paths[i]) for i in val_idx], labels[val_idx], image_size, batch, config=config,
        shuffle=False, seed=config.seed)) if len(val_idx) else None

    head_weights = model.get_weights()
    previous = keras.config.dtype_policy()
    if policy:
        keras.config.set_dtype_policy(policy)
    try:
        with distribution.scope():
            if policy or config.distribute != "none":
                tuned_backbone = build_backbone(spec, weights=None, image_size=image_size)
                x = tuned_backbone.output
                for name in ("head_dropout", "predictions"):  # the head phase's layers, L2 penalty included
                    layer_config = model.get_layer(name).get_config()
                    if name == "predictions":
                        layer_config["dtype"] = "float32"  # softmax in float32 under a mixed policy
                    x = model.get_layer(name).__class__.from_config(layer_config)(x)
                tuned = training_model(tuned_backbone.input, x, name=model.name, strategy=distribution,
                                       batch_spec=train_data.element_spec)
                tuned.set_weights(head_weights)
                sync_weights(tuned, distribution)
            else:
                tuned, tuned_backbone = model, backbone  # the same layer objects
            rates = set_trainable(tuned_backbone, spec, phase, config.train_bn)
            for name in ("head_dropout", "predictions"):
                tuned.get_layer(name).trainable = True
            rates["predictions"] = phase.rate_multipliers[0]
            trainable = sum(int(np.prod(w.shape)) for w in tuned.trainable_weights)
            log.info("Fine-tuning %d trainable weights in %d layers.", trainable, len(rates))
            fitted, fit_train, fit_val, callbacks, views_info = frozen_views.fit_inputs(
                config, spec, tuned, tuned_backbone, phase, train_data, val_data, len(train_idx), len(val_idx),
                batch, verbose)
            rows, improved = fine_tune(fitted, config, rates, fit_train, fit_val,
                                       steps_per_epoch=steps_for(len(train_idx), batch), checkpoint_dir=checkpoint_dir,
                                       class_weight=class_weight, baseline=baseline, verbose=verbose,
                                       extra_callbacks=callbacks, elapsed_before=views_info.get("seconds", 0.0))
    except BaseException:
        model.set_weights(head_weights)  # a retry (--batch-size auto) starts where this attempt did
        raise
    finally:
        keras.config.set_dtype_policy(previous)
    if not improved:
        log.warning("No fine-tune epoch beat the head phase's validation loss (%.4f, best fine-tune epoch %.4f): "
                    "keeping the head phase's model.", baseline, min(row["val_loss"] for row in rows))
        model.set_weights(head_weights)
    elif tuned is not model:
        model.set_weights(tuned.get_weights())  # float32, outside any distribution scope
    # A new, uncompiled model on the same layers: the saved file needs no optimizer class to load.
    model = keras.Model(model.input, model.output, name=model.name)
    info = {"epochs_run": len(rows), "trainable_weights": trainable, "trained_layers": len(rates),
            "frozen_views": views_info,
            "mixed_precision": policy or "none", "xla": bool(fitted.jit_compile), "device": xla_device(),
            "distribute": config.distribute,
            "replicas": distribution.num_replicas_in_sync, "kept": "fine-tune" if improved else "head"}
    return model, rows, info

