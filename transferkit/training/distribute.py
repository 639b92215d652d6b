"""``--distribute``: the fine-tune phase on every GPU of a machine, or on several machines.

- ``mirrored``: ``tf.distribute.MirroredStrategy``, one replica per local GPU (the CPU alone on
  these machines, where it runs as one replica).
- ``multi-worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` across the workers named by the
  ``TF_CONFIG`` environment variable; every worker runs the same ``transferkit train`` command.
  Every worker extracts (its own cache, or a shared one: the cache is safe with several writers)
  and trains the head phase on the cached features, which are the same computation on each; the
  fine-tune phase then trains one model in sync, each worker reading its share of every batch.
  The chief (the ``chief`` task, else worker 0) writes ``RUN_DIR``; every other worker writes to
  ``RUN_DIR.worker-I`` for its checkpoints (so ``--resume`` works on every worker) and deletes
  it when the run finishes.

Keras 3's ``fit`` does not run under ``MultiWorkerMirroredStrategy`` as released
(keras-team/keras#20585, reproduced here on TensorFlow 2.21 / Keras 3.15): it reduces a batch of
input tensors to build the model's metrics, and reduces scalar logs along axis 0. The model used
for training (:func:`training_model`) overrides those two steps; nothing else changes, and the
saved model is a plain functional ``keras.Model``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import InputError

log = logging.getLogger("transferkit")

TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')


@dataclass(frozen=True)
class WorkerTask:
    """This process's place in a multi-worker cluster (from ``TF_CONFIG``)."""

    type: str
    index: int
    num_workers: int
    has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        """The chief writes the run folder: the ``chief`` task, or worker 0 when there is none."""
        return self.type == "chief" or (self.index == 0 and not self.has_chief)


def worker_task(environ: dict | None = None) -> WorkerTask:
    """Read and check ``TF_CONFIG`` for ``--distribute multi-worker``.

    Raises:
        InputError: ``TF_CONFIG`` is missing, is not JSON, or does not name this task in its cluster.

    Example:
        >>> env = {"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}'}
        >>> task = worker_task(env)
        >>> task.index, task.num_workers, task.is_chief
        (1, 2, False)
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    fix = f"Set it on every worker, e.g. {TF_CONFIG_EXAMPLE} (index 0, 1, ... per worker)."
    if not raw.strip():
        raise InputError(f"--distribute multi-worker needs the TF_CONFIG environment variable (the cluster's "
                         f"workers and this worker's index). {fix}")
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config["task"]
        kind, index = task["type"], int(task["index"])
        members = cluster[kind]
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"TF_CONFIG is not a valid cluster description ({type(exc).__name__}: {exc}). {fix}") from exc
    if kind not in ("chief", "worker") or not 0 <= index < len(members):
        raise InputError(f"TF_CONFIG's task {kind}:{index} is not a chief or worker of its cluster "
                         f"({', '.join(f'{k}: {len(v)}' for k, v in cluster.items())}). {fix}")
    num_workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    return WorkerTask(kind, index, num_workers, has_chief=bool(cluster.get("chief")))


def output_dir_for(run_dir: str | os.PathLike, distribute: str) -> Path:
    """Where this process writes: ``RUN_DIR`` itself, or ``RUN_DIR.worker-I`` on a non-chief worker."""
    run_dir = Path(run_dir)
    if distribute != "multi-worker":
        return run_dir
    task = worker_task()
    return run_dir if task.is_chief else run_dir.with_name(f"{run_dir.name}.{task.type}-{task.index}")


def make_strategy(name: str):
    """The ``tf.distribute`` strategy for ``--distribute`` (TensorFlow's default one for ``none``).

    ``MultiWorkerMirroredStrategy`` must exist before TensorFlow runs its first operation, so the
    training job creates the strategy first, whatever its phases.
    """
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    else:
        task = worker_task()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log.info("--distribute multi-worker: %s %d of %d workers%s.", task.type, task.index, task.num_workers,
                 " (chief: writes the run folder)" if task.is_chief else "")
    log.info("--distribute %s: %d replica(s) in sync.", name, strategy.num_replicas_in_sync)
    return strategy


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def training_model(inputs, outputs, *, name: str, strategy, batch_spec):
    """A functional model for ``fit`` under ``strategy``; call inside ``strategy.scope()``.

    Args:
        batch_spec: the training dataset's ``element_spec``, which Keras needs to build the
            model's metrics without pulling a batch (see the module docstring).
    """
    import keras

    if not is_multi_worker(strategy):
        return keras.Model(inputs, outputs, name=name)
    import tensorflow as tf

    # Hand-written because keras-team/keras#20585 is open: remove when Keras' fit runs under
    # MultiWorkerMirroredStrategy (tests/training/test_fine_tuning.py's two-worker test will show it).
    class MultiWorkerModel(keras.Model):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            # Keras reduces one input batch across workers only to learn its shapes; the
            # dataset's element spec says the same without the (failing) collective.
            with self.distribute_strategy.scope():
                self._symbolic_build(data_batch=batch_spec)

        # Keras reduces per-replica logs with axis=0 under this strategy; scalars have no axis 0.
        def train_step(self, data):
            return {key: tf.reshape(value, [1]) for key, value in super().train_step(data).items()}

        def test_step(self, data):
            return {key: tf.reshape(value, [1]) for key, value in super().test_step(data).items()}

    return MultiWorkerModel(inputs, outputs, name=name)


def sync_weights(model, strategy) -> None:
    """Start every worker from the same weights: each worker's mean across the cluster.

    Every worker trained the head phase on its own (the same features, so the same weights up to
    floating-point differences between machines); a mirrored variable assigned in cross-replica
    context is not synchronised across workers, so this makes the starting point one.
    """
    if not is_multi_worker(strategy):
        return
    import tensorflow as tf

    variables = [v for v in model.weights if "float" in v.dtype]

    @tf.function
    def mean_over_workers():
        def replica_mean():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])

        return strategy.run(replica_mean)

    means = [strategy.experimental_local_results(m)[0] for m in mean_over_workers()]
    for variable, mean in zip(variables, means, strict=True):
        variable.assign(mean)


def shard_by_data(dataset):
    """Each worker reads its share of every batch (files cannot be sharded: they are one list)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
