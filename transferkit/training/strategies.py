"""The three training strategies as pure phase plans, and which layers each phase trains.

Nothing here builds or trains a model: a plan is data, so it is tested without TensorFlow and
printed before a long run starts.

- ``freeze-all``: one phase, the head on the frozen backbone's cached features.
- ``fine-tune-top``: that phase, then the top N blocks of the backbone train together with the
  head at lower rates.
- ``full-retrain``: that phase, then every block trains (from ImageNet weights, or from scratch
  with ``--weights none``).

Learning rates follow the rule of thumb of discriminative fine-tuning (ULMFiT, fastai's
``fine_tune``): the head keeps its rate, the top blocks (the ~20% ``fine-tune-top`` unfreezes by
default) get a tenth of it, and deeper blocks a hundredth, so the pretrained features move less
the more general they are.

Example:
    >>> [p.name for p in plan_phases("fine-tune-top", num_blocks=17, unfreeze_blocks=None)]
    ['head', 'fine-tune']
    >>> plan_phases("fine-tune-top", num_blocks=17, unfreeze_blocks=None)[1].unfreeze_blocks
    3
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transferkit.errors import InputError

STRATEGIES = ("freeze-all", "fine-tune-top", "full-retrain", "auto")

#: Share of a backbone's blocks ``fine-tune-top`` unfreezes by default (at least one): ResNet50's
#: last stage (3 of 16), MobileNetV2's last 3 inverted residuals and its final 1x1 convolution
#: (4 of 18), VGG's block5 (1 of 5), InceptionV3's last 2 (of 11).
DEFAULT_UNFREEZE_SHARE = 0.2

#: Rate of the topmost unfrozen block and of deeper blocks, as fractions of the head's rate.
TOP_BLOCK_RATE = 0.1
DEEPER_BLOCK_RATE = 0.01

#: ``auto`` thresholds in training images per class: below the first, the backbone stays frozen
#: (too little data to move millions of weights without overfitting); from the second on, it all
#: trains. Yosinski et al. 2014 and the Keras transfer-learning guide draw the same lines.
AUTO_FINE_TUNE_FROM = 100
AUTO_FULL_RETRAIN_FROM = 1000

#: The fine-tune phase's peak rate (the head's; blocks get their fractions of it) when
#: ``--fine-tune-learning-rate`` is not given, from this many training images on; below, it is
#: scaled down in proportion. Measured with mobilenet_v2: sign digits (1,444 training images)
#: reach 0.981 at 1e-3 and 0.958 at 3e-4; ants/bees (206) lose to freeze-all at 1e-3 (0.928,
#: 0.895, 0.928 for seeds 0-2) and reach 0.941 at 2e-4 and 1e-4.
FINE_TUNE_RATE = 1e-3
FINE_TUNE_FULL_RATE_FROM = 1000


@dataclass(frozen=True)
class Phase:
    """One training phase.

    Attributes:
        name: ``head`` (backbone frozen, trains on cached features) or ``fine-tune``.
        unfreeze_blocks: how many of the backbone's top blocks train; 0 for none, ``num_blocks``
            for all (the stem included).
        on_features: trains on cached bottleneck features instead of running the backbone.
        top_blocks: how many of the unfrozen blocks count as "top" (the rest are "deeper").
        rate_multipliers: head / top blocks / deeper blocks rates as fractions of the phase's rate.
    """

    name: str
    unfreeze_blocks: int
    on_features: bool
    top_blocks: int = 0
    rate_multipliers: tuple[float, float, float] = (1.0, TOP_BLOCK_RATE, DEEPER_BLOCK_RATE)


def default_unfreeze_blocks(num_blocks: int) -> int:
    """The number of top blocks ``fine-tune-top`` unfreezes when ``--unfreeze-blocks`` is not given."""
    return max(1, round(num_blocks * DEFAULT_UNFREEZE_SHARE))


def plan_phases(strategy: str, *, num_blocks: int, unfreeze_blocks: int | None = None) -> list[Phase]:
    """The phases of a strategy for a backbone with ``num_blocks`` blocks.

    Args:
        strategy: ``freeze-all``, ``fine-tune-top`` or ``full-retrain`` (resolve ``auto`` first
            with :func:`choose_strategy`).
        num_blocks: blocks of the backbone (``BackboneSpec.num_blocks``).
        unfreeze_blocks: top blocks ``fine-tune-top`` trains; ``None`` for the default.

    Raises:
        InputError: an unknown strategy, or more blocks than the backbone has.
    """
    head = Phase("head", 0, on_features=True)
    top = default_unfreeze_blocks(num_blocks)
    if strategy == "freeze-all":
        return [head]
    if strategy == "full-retrain":
        return [head, Phase("fine-tune", num_blocks, on_features=False, top_blocks=top)]
    if strategy == "fine-tune-top":
        blocks = default_unfreeze_blocks(num_blocks) if unfreeze_blocks is None else unfreeze_blocks
        if not 1 <= blocks <= num_blocks:
            raise InputError(
                f"Invalid --unfreeze-blocks: expected 1 to {num_blocks} (the backbone's blocks), received {blocks}. "
                "Use --strategy full-retrain to train every block."
            )
        return [head, Phase("fine-tune", blocks, on_features=False, top_blocks=min(top, blocks))]
    raise InputError(f"Invalid --strategy: expected one of {', '.join(STRATEGIES)}, received {strategy!r}.")


#: ``auto`` fine-tunes only where the frozen head's evidence says it will pay: its cross-validated
#: accuracy still rises by at least this much each time its training set doubles (the frozen
#: features have not saturated on this task) ...
AUTO_RISING_PER_DOUBLING = 0.01
#: ... or it still misses at least this share of held-out images (the features fit the task badly).
#: Measured (mobilenet_v2, flip-averaged, 5-fold CV on train + val): ants/bees +0.4 points per
#: doubling, error 4.1% (fine-tuning gained nothing: 0.946 vs 0.954); sign digits +2.6 points per
#: doubling, error 6.0% (fine-tuning: 0.986 vs 0.94).
AUTO_ERROR_FROM = 0.10


@dataclass(frozen=True)
class AutoEvidence:
    """What ``--strategy auto`` measured before deciding (see :func:`transferkit.heads.softmax.auto_evidence`).

    Attributes:
        cv_accuracy: the frozen head's cross-validated accuracy at its chosen C on train + val.
        learning_curve: ``(share of the training folds, cross-validated accuracy)`` pairs.
        rise_per_doubling: least-squares slope of accuracy against log2(share).
        seconds_per_epoch: estimated wall time of one fine-tune epoch on this machine.
        fine_tune_epochs: epochs the fine-tune phase would run (at most).
        setup_seconds: estimated wall time before the first epoch (the frozen blocks' views).
    """

    cv_accuracy: float
    learning_curve: tuple[tuple[float, float], ...]
    rise_per_doubling: float
    seconds_per_epoch: float
    fine_tune_epochs: int
    setup_seconds: float = 0.0

    @property
    def fine_tune_seconds(self) -> float:
        """The fine-tune phase's estimated wall time."""
        return self.setup_seconds + self.seconds_per_epoch * self.fine_tune_epochs

    def as_dict(self) -> dict:
        return {"cv_accuracy": round(self.cv_accuracy, 4),
                "learning_curve": [{"share": share, "cv_accuracy": round(acc, 4)}
                                   for share, acc in self.learning_curve],
                "rise_per_doubling": round(self.rise_per_doubling, 4),
                "estimated_fine_tune_seconds": round(self.fine_tune_seconds, 1),
                "seconds_per_epoch": round(self.seconds_per_epoch, 3), "setup_seconds": round(self.setup_seconds, 1)}


def choose_strategy(train_counts: Sequence[int], evidence: AutoEvidence, *, fine_tune_from: int = AUTO_FINE_TUNE_FROM,
                    full_retrain_from: int = AUTO_FULL_RETRAIN_FROM) -> tuple[str, str]:
    """``--strategy auto``: the strategy the evidence supports, and why, with the expected cost.

    Fine-tuning needs data to move millions of weights without overfitting (the smallest class
    has at least ``fine_tune_from`` training images; from ``full_retrain_from`` on, every block
    trains) and must have something to gain: the frozen head's learning curve still rising by
    :data:`AUTO_RISING_PER_DOUBLING` per doubling, or its held-out error at least
    :data:`AUTO_ERROR_FROM`. Otherwise the frozen head is kept.

    Returns:
        ``(strategy, reason)``; the reason names the evidence and, for fine-tuning, the expected wall time.

    Example:
        >>> flat = AutoEvidence(0.96, ((0.25, 0.95), (0.5, 0.955), (1.0, 0.96)), 0.005, 30.0, 20)
        >>> choose_strategy([120, 130], flat)[0]
        'freeze-all'
        >>> rising = AutoEvidence(0.94, ((0.25, 0.89), (0.5, 0.92), (1.0, 0.94)), 0.025, 30.0, 20)
        >>> choose_strategy([120, 130], rising)[0], choose_strategy([40, 55], rising)[0]
        ('fine-tune-top', 'freeze-all')
    """
    smallest = min(train_counts)
    error = 1 - evidence.cv_accuracy
    seen = (f"the frozen head's cross-validated accuracy is {evidence.cv_accuracy:.3f} and rises "
            f"{evidence.rise_per_doubling * 100:+.1f} points per doubling of its training images")
    if smallest < fine_tune_from:
        return "freeze-all", (f"{seen}, but the smallest class has {smallest} training images (< {fine_tune_from}): "
                              "too few to fine-tune without overfitting; train only a head on the frozen backbone")
    rising = evidence.rise_per_doubling >= AUTO_RISING_PER_DOUBLING
    if not rising and error < AUTO_ERROR_FROM:
        return "freeze-all", (f"{seen} (< {AUTO_RISING_PER_DOUBLING * 100:g}) with {error:.1%} held-out error "
                              f"(< {AUTO_ERROR_FROM:.0%}): the frozen features have saturated, fine-tuning is not "
                              f"expected to pay (it would take about {_duration(evidence)})")
    strategy = "full-retrain" if smallest >= full_retrain_from else "fine-tune-top"
    because = (f"still rising (>= {AUTO_RISING_PER_DOUBLING * 100:g})" if rising
               else f"with {error:.1%} held-out error (>= {AUTO_ERROR_FROM:.0%})")
    return strategy, (f"{seen}, {because}, and the smallest class has {smallest} training images: fine-tuning is "
                      f"expected to gain up to {error * 100:.1f} points; expected wall time about "
                      f"{_duration(evidence)}")


def _duration(evidence: AutoEvidence) -> str:
    seconds = evidence.fine_tune_seconds
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 120 else f"{minutes:.0f} min"


def fine_tune_rate(num_train: int, rate: float | None = None) -> tuple[float, str]:
    """The fine-tune phase's peak rate and why: ``rate`` when given, else :data:`FINE_TUNE_RATE`
    scaled down in proportion below :data:`FINE_TUNE_FULL_RATE_FROM` training images (fewer
    images: gentler steps, or the pretrained features are overwritten by noise).

    Example:
        >>> fine_tune_rate(206)
        (0.000206, '206 training images (< 1000): 0.001 scaled down in proportion')
        >>> fine_tune_rate(5000)[0], fine_tune_rate(206, 3e-4)[0]
        (0.001, 0.0003)
    """
    if rate is not None:
        return rate, "--fine-tune-learning-rate"
    if num_train >= FINE_TUNE_FULL_RATE_FROM:
        return FINE_TUNE_RATE, f"{num_train} training images (>= {FINE_TUNE_FULL_RATE_FROM})"
    return (round(FINE_TUNE_RATE * num_train / FINE_TUNE_FULL_RATE_FROM, 8),
            f"{num_train} training images (< {FINE_TUNE_FULL_RATE_FROM}): {FINE_TUNE_RATE:g} scaled down in "
            "proportion")


def layer_rates(boundaries: Sequence[tuple[str, int]], num_layers: int, phase: Phase) -> list[float | None]:
    """Per backbone layer: its learning-rate multiplier in this phase, or ``None`` when frozen.

    ``boundaries`` come from :func:`transferkit.models.build.block_boundaries` (block name, index of
    its last layer). The stem counts with the first block, so it trains only when every block does.

    Example:
        >>> layer_rates([("b1", 1), ("b2", 3), ("b3", 4)], 5, Phase("fine-tune", 2, False, top_blocks=1))
        [None, None, 0.01, 0.01, 0.1]
    """
    _, top_rate, deeper_rate = phase.rate_multipliers
    rates: list[float | None] = [None] * num_layers
    start = 0
    for rank, (_, end) in enumerate(boundaries):
        from_top = len(boundaries) - 1 - rank
        if from_top < phase.unfreeze_blocks:
            rates[start:end + 1] = [top_rate if from_top < phase.top_blocks else deeper_rate] * (end + 1 - start)
        start = end + 1
    return rates
