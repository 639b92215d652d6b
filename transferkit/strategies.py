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


def choose_strategy(train_counts: Sequence[int], *, fine_tune_from: int = AUTO_FINE_TUNE_FROM,
                    full_retrain_from: int = AUTO_FULL_RETRAIN_FROM) -> tuple[str, str]:
    """``--strategy auto``: the strategy practitioners pick for this much data, and why.

    The smallest class decides: a model cannot learn a class from fewer images by training more
    weights.

    Args:
        train_counts: training images per class.

    Returns:
        ``(strategy, reason)``.

    Example:
        >>> choose_strategy([40, 55])
        ('freeze-all', 'the smallest class has 40 training images (< 100): train only a head on the frozen backbone')
    """
    smallest = min(train_counts)
    if smallest >= full_retrain_from:
        return "full-retrain", (f"the smallest class has {smallest} training images (>= {full_retrain_from}): "
                                "enough to train every layer")
    if smallest >= fine_tune_from:
        return "fine-tune-top", (f"the smallest class has {smallest} training images ({fine_tune_from} to "
                                 f"{full_retrain_from - 1}): fine-tune the top blocks")
    return "freeze-all", (f"the smallest class has {smallest} training images (< {fine_tune_from}): "
                          "train only a head on the frozen backbone")


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

    ``boundaries`` come from :func:`transferkit.backbones.block_boundaries` (block name, index of
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
