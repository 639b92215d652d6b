"""The report's figures as PNG bytes: training curves, confusion matrices, accuracy intervals, the feature map.

matplotlib draws headless (the Agg canvas, never ``pyplot``, so no GUI backend or global figure
state is touched). Figures stay legible from 2 to a few hundred classes: the size grows with the
number of classes, fonts shrink within readable bounds, long class names are cut with an ellipsis
(the full names are in the report's tables) and per-cell numbers are dropped when cells get too
small to hold them.

Example:
    >>> png = confusion_matrix_png([[5, 1], [0, 6]], ["cat", "dog"])  # doctest: +SKIP
    >>> open("confusion.png", "wb").write(png)  # doctest: +SKIP
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

#: Above this many classes a confusion matrix shows colours only, no number per cell.
MAX_ANNOTATED_CLASSES = 30
#: t-SNE is quadratic-ish in the number of points: a stratified sample of this many is projected
#: (1,000 points show how classes separate; 2,000 took 6 s of a 2-core CPU, 1,000 take 2 s).
MAX_TSNE_POINTS = 1000
#: t-SNE iterations: 250 of early exaggeration, then 250 to settle the map (scikit-learn's default
#: of 1,000 refines distances the picture does not need).
TSNE_ITERATIONS = 500
#: PCA is cheap, but drawing 100,000 dots is neither fast nor readable.
MAX_SCATTER_POINTS = 10000
#: Up to this many classes get a legend; beyond it, names are written at the class centres.
MAX_LEGEND_CLASSES = 20

_DPI = 100


def short_label(name: str, max_chars: int) -> str:
    """``name`` cut to ``max_chars`` characters with an ellipsis; shorter names unchanged.

    Example:
        >>> short_label("golden_retriever_puppy", 12)
        'golden_retr…'
    """
    name = " ".join(str(name).split())  # newlines and tabs in a folder name would break the layout
    return name if len(name) <= max_chars else name[: max(1, max_chars - 1)] + "…"


def short_labels(names: Sequence[str], max_chars: int) -> list[str]:
    """Shortened class names that stay distinct: cut at the end, else drop the shared start and end.

    Names like ``dataset_v2_class_017_photos`` all look alike once cut at the end; then the
    prefix and suffix every name shares give way to ``…`` and long middles lose their centre.
    If that still leaves duplicates, the class index goes in front.

    Example:
        >>> short_labels(["imagenet_n01440764_tench", "imagenet_n01443537_goldfish"], 12)
        ['…n0144…tench', '…n0144…dfish']
    """
    cut = [short_label(n, max_chars) for n in names]
    if len(set(cut)) == len(cut):
        return cut
    clean = [" ".join(str(n).split()) for n in names]
    prefix = _shared_length(clean)
    suffix = _shared_length([n[prefix:][::-1] for n in clean])
    labels = []
    for name in clean:
        core = name[prefix:len(name) - suffix] if suffix else name[prefix:]
        room = max(3, max_chars - (prefix > 0) - (suffix > 0))
        if len(core) > room:  # keep both ends of the distinctive part
            core = core[: room - room // 2 - 1] + "…" + core[len(core) - room // 2:]
        labels.append(("…" if prefix else "") + core + ("…" if suffix else ""))
    if len(set(labels)) < len(labels):
        labels = [short_label(f"{i}: {label}", max_chars) for i, label in enumerate(labels)]
    return labels


def _shared_length(names: Sequence[str]) -> int:
    """Length of the start all names share, cut back to just after a separator (``_ - . space /``)."""
    import os.path

    shared = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    return max(shared.rfind(sep) for sep in "_-. /") + 1  # 0 when no separator: keep whole words


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    # "tight": constrained layout alone can leave a title cut off above an equal-aspect heat map.
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- training curves


def training_curves_png(history: dict[str, list[float]], phases: Sequence[str] | None = None,
                        best_epoch: int | None = None) -> bytes:
    """Loss and accuracy per epoch, train solid and validation dashed, phases marked.

    Args:
        history: column name -> one value per epoch (NaN where missing), as read from
            ``history.csv``: ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` are drawn, other
            metrics too when they pair with a ``val_`` column.
        phases: the phase name of each epoch; a dotted line and the name mark each new phase.
        best_epoch: 1-based epoch to mark (the one early stopping kept), for single-phase runs.
    """
    metrics = [m for m in ("loss", "accuracy") if m in history or f"val_{m}" in history]
    metrics += sorted(k for k in history if f"val_{k}" in history and k not in metrics)
    metrics = metrics or ["loss"]
    num_epochs = max((len(v) for v in history.values()), default=0)
    fig = _figure(5.2 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    epochs = np.arange(1, num_epochs + 1)
    for ax, metric in zip(axes, metrics, strict=True):
        for key, style, label in ((metric, "-", "train"), (f"val_{metric}", "--", "validation")):
            values = np.asarray(history.get(key, []), dtype=float)
            if len(values) and np.isfinite(values).any():
                ax.plot(epochs[: len(values)], values, style, label=label, marker="." if num_epochs <= 30 else None)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        _mark_phases(ax, phases)
        if best_epoch and not (phases and len(set(phases)) > 1):
            ax.axvline(best_epoch, color="0.4", linewidth=1, linestyle=":")
            ax.annotate("best epoch", (best_epoch, 0), xycoords=("data", "axes fraction"), xytext=(-3, 4),
                        textcoords="offset points", fontsize=8, color="0.3", ha="right")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _png(fig)


def cv_curve_png(curve: Sequence[Mapping[str, float]], chosen_c: float) -> bytes:
    """The exact head's cross-validation curve: held-out log-loss against ``C`` (log axis), one
    standard deviation over the folds shaded, the chosen ``C`` marked.

    Args:
        curve: one mapping per grid point with ``C``, ``log_loss`` and ``log_loss_std``, as in
            ``metrics.json``'s ``head_fit.cv_curve``.
        chosen_c: the ``C`` the head was fitted with.
    """
    c = np.array([float(point["C"]) for point in curve])
    loss = np.array([float(point["log_loss"]) for point in curve])
    std = np.array([float(point.get("log_loss_std", 0.0)) for point in curve])
    fig = _figure(5.6, 3.6)
    ax = fig.subplots()
    ax.plot(c, loss, "-", marker=".", label="held-out log-loss (mean of folds)")
    ax.fill_between(c, loss - std, loss + std, alpha=0.2, label="+- 1 standard deviation")
    ax.axvline(chosen_c, color="0.4", linewidth=1, linestyle=":")
    ax.annotate(f"chosen C = {chosen_c:.3g}", (chosen_c, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8, color="0.3")
    ax.set_xscale("log")
    ax.set_xlabel("C (inverse L2 strength; right = weaker penalty)")
    ax.set_ylabel("log-loss")
    ax.set_title("Head regularisation by cross-validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def _mark_phases(ax, phases: Sequence[str] | None) -> None:
    if not phases or len(set(phases)) < 2:
        return
    starts = [i for i in range(len(phases)) if i == 0 or phases[i] != phases[i - 1]]
    for i in starts:
        if i:
            ax.axvline(i + 0.5, color="tab:red", linewidth=1, linestyle=":")
        ax.annotate(short_label(phases[i], 18), (i + 1, 0), xycoords=("data", "axes fraction"), xytext=(2, 4),
                    textcoords="offset points", fontsize=8, color="tab:red")


# ----------------------------------------------------------------------------- confusion matrix


def confusion_matrix_png(matrix, class_names: Sequence[str], normalize: bool = False,
                         title: str | None = None) -> bytes:
    """The confusion matrix as a heat map, rows the true class, columns the predicted one.

    With ``normalize`` each row is divided by its total, so a cell is the share of the true
    class predicted as that column and the diagonal is each class's recall. Zero cells stay
    blank; numbers are printed in cells up to :data:`MAX_ANNOTATED_CLASSES` classes. ``title``
    replaces the default one ("Confusion matrix, counts" or "..., share of each true class").
    """
    counts = np.asarray(matrix, dtype=float)
    n = len(class_names)
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    else:
        values = counts
    # The matrix is 3.2 in wide for a few classes and grows to 0.16 in per class for hundreds;
    # fonts follow the cell size, within readable bounds.
    cell = float(np.clip(4.2 / max(n, 1), 0.16, 1.1)) if n <= 26 else 0.16
    max_chars = 28 if n <= MAX_ANNOTATED_CLASSES else 18
    tick_font = float(np.clip(cell * 72 * 0.75, 4.5, 10))
    names = short_labels(class_names, max_chars)
    label_room = 0.085 * max(map(len, names), default=1) * tick_font / 10 + 0.5  # inches for tick labels
    side = n * cell
    fig = _figure(side + label_room + 1.2, side + label_room + 0.8)
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(values.max(), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest", aspect="equal")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8, aspect=30, pad=0.02)
    colorbar.ax.tick_params(labelsize=8)
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 45, ha="center" if n > 6 else "right",
                  fontsize=tick_font, rotation_mode="default" if n > 6 else "anchor")
    ax.set_yticks(range(n), names, fontsize=tick_font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title is None:
        title = "Confusion matrix, share of each true class" if normalize else "Confusion matrix, counts"
    ax.set_title(title, fontsize=11)
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="0.92", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    if n <= MAX_ANNOTATED_CLASSES:
        font = float(np.clip(cell * 72 * 0.33, 5, 10))
        for i, j in zip(*np.nonzero(counts), strict=True):
            text = f"{values[i, j]:.2f}" if normalize else f"{int(counts[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=font,
                    color="white" if values[i, j] > 0.55 * vmax else "black")
    return _png(fig)


# ----------------------------------------------------------------------------- accuracy intervals


def accuracy_intervals_png(heads: Sequence[Mapping], reference: str, xlabel: str, title: str = "") -> bytes:
    """Accuracy per head (in the given order, first at the top) with its 95% interval; seeds as ticks.

    Args:
        heads: per head a mapping with ``head`` (name), ``accuracy_ci`` (low, high) and ``runs``
            (one mapping per seed with its ``accuracy``; the first run's is the dot).
        reference: the head drawn in orange, with a dotted line at its accuracy.
        xlabel: what the axis shows (e.g. the number of test images).

    Example:
        >>> accuracy_intervals_png([{"head": "knn", "accuracy_ci": [0.8, 0.9], "runs": [{"accuracy": 0.85}]}],
        ...                        "knn", "test accuracy")[:4]
        b'\\x89PNG'
    """
    n = len(heads)
    fig = _figure(7.5, 1.2 + 0.45 * n)
    ax = fig.add_subplot()
    positions = np.arange(n)[::-1]
    for y, row in zip(positions, heads, strict=True):
        first = row["runs"][0]["accuracy"]
        low, high = row["accuracy_ci"]
        colour = "tab:orange" if row["head"] == reference else "tab:blue"
        ax.errorbar(first, y, xerr=[[first - low], [high - first]], fmt="o", color=colour, capsize=4)
        if len(row["runs"]) > 1:
            ax.plot([run["accuracy"] for run in row["runs"]], [y] * len(row["runs"]), "|", color="0.4", ms=9)
        ax.annotate(f"{first:.3f}", (high, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=9)
    marked = [row for row in heads if row["head"] == reference]
    if marked:
        ax.axvline(marked[0]["runs"][0]["accuracy"], color="tab:orange", linestyle=":", linewidth=1)
    ax.set_yticks(positions, short_labels([row["head"] for row in heads], 24))
    lows = [row["accuracy_ci"][0] for row in heads] + [run["accuracy"] for row in heads for run in row["runs"]]
    left = max(0.0, min(lows) - 0.05)
    ax.set_xlim(left, 1.0 + 0.12 * (1.0 - left))  # room for the value written right of each interval
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(axis="x", color="0.9")
    return _png(fig)


# ----------------------------------------------------------------------------- feature map


def project_features(features: np.ndarray, labels: np.ndarray | None, method: str = "pca", *,
                     max_points: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Project feature vectors to 2-D with PCA or t-SNE (scikit-learn), on a stratified sample.

    Args:
        features: ``(n, d)`` vectors, e.g. cached bottleneck features.
        labels: ``(n,)`` class indices, or None for unlabelled images (one group, label 0).
        method: ``"pca"`` or ``"tsne"``.
        max_points: sample cap; default :data:`MAX_TSNE_POINTS` for t-SNE, :data:`MAX_SCATTER_POINTS`
            for PCA. The sample keeps every class's share (and every class).
        seed: for the sample and t-SNE's optimisation, so a report is reproducible.

    Returns:
        ``(points (m, 2), labels (m,), info)`` with ``info`` holding the method, the number of
        points and, for PCA, the variance share of each axis.

    Example:
        >>> xy, y, info = project_features(np.random.rand(50, 8), np.arange(50) % 2)
        >>> xy.shape, info["method"]
        ((50, 2), 'pca')
    """
    from sklearn.decomposition import PCA

    if method not in ("pca", "tsne"):
        raise ValueError(f"Unknown projection method {method!r}; expected 'pca' or 'tsne'.")
    features = np.asarray(features, dtype=np.float32)
    labels = np.zeros(len(features), dtype=np.int64) if labels is None else np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (n, d) with one label per row; got {features.shape} and "
                         f"{labels.shape}.")
    if len(features) < 3:
        from transferkit.errors import DataError

        raise DataError(f"A 2-D projection needs at least 3 images with features; got {len(features)}. "
                        "Add images to the folder.")
    cap = max_points or (MAX_TSNE_POINTS if method == "tsne" else MAX_SCATTER_POINTS)
    index = _stratified_sample(labels, cap, seed)
    x, y = features[index], labels[index]
    info: dict = {"method": method, "num_points": int(len(index)), "num_total": int(len(labels))}
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed)
        # Fit on every vector (cheap), draw the sample.
        pca.fit(features if len(features) <= 50_000 else x)
        info["explained_variance"] = [float(v) for v in pca.explained_variance_ratio_]
        return pca.transform(x), y, info
    from sklearn.manifold import TSNE

    # The usual recipe: PCA to 50 dimensions first removes noise and speeds t-SNE up.
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (len(x) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed,
                max_iter=TSNE_ITERATIONS)
    info["perplexity"] = perplexity
    return tsne.fit_transform(x), y, info


def _stratified_sample(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of at most ``cap`` rows keeping each class's share (at least one row per class), sorted."""
    if len(labels) <= cap:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts * cap / len(labels)).astype(int))
    chosen = [rng.choice(np.flatnonzero(labels == c), size=min(q, n), replace=False)
              for c, q, n in zip(classes, quota, counts, strict=True)]
    return np.sort(np.concatenate(chosen))


def feature_map_png(projections: Sequence[tuple[np.ndarray, np.ndarray, dict]], class_names: Sequence[str],
                    title: str = "") -> bytes:
    """Scatter plots of 2-D projections (one panel each) coloured by class.

    Up to :data:`MAX_LEGEND_CLASSES` classes get a legend, more get their (shortened) names
    written at each class's median point.
    """
    n = len(class_names)
    cmap = _class_colours(n)
    legend_names, centre_names = short_labels(class_names, 24), short_labels(class_names, 14)
    panels = len(projections)
    side = 5.6 if n <= 40 else 7.5  # room for the names written at the class centres
    fig = _figure(side * panels + (2.4 if n <= MAX_LEGEND_CLASSES else 0), side - 0.2)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, (points, labels, info) in zip(axes, projections, strict=True):
        size = float(np.clip(6000 / max(len(points), 1), 5, 40))
        for c in range(n):
            mask = labels == c
            if mask.any():
                ax.scatter(points[mask, 0], points[mask, 1], s=size, color=cmap[c], alpha=0.75, linewidths=0,
                           label=legend_names[c])
        if n > MAX_LEGEND_CLASSES:
            font = float(np.clip(260 / n, 5.5, 8))
            for c in range(n):
                mask = labels == c
                if mask.any():
                    cx, cy = np.median(points[mask], axis=0)
                    ax.text(cx, cy, centre_names[c], fontsize=font, ha="center", va="center",
                            bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "alpha": 0.6, "linewidth": 0})
        name = "PCA" if info["method"] == "pca" else "t-SNE"
        shown = (f"a sample of {info['num_points']} of {info['num_total']} images"
                 if info["num_points"] < info["num_total"] else f"{info['num_points']} images")
        ax.set_title(f"{name}, {shown}", fontsize=11)
        if info["method"] == "pca":
            var = info.get("explained_variance", [0, 0])
            ax.set_xlabel(f"PC1 ({var[0]:.0%} of variance)")
            ax.set_ylabel(f"PC2 ({var[1]:.0%} of variance)")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.grid(alpha=0.2)
    if n <= MAX_LEGEND_CLASSES:
        handles, names = axes[-1].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right upper", fontsize=8, markerscale=2,
                   title="class", title_fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    return _png(fig)


def _class_colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    # Many classes: golden-ratio steps along the map, so neighbouring labels get distant colours.
    turbo = colormaps["turbo"]
    return [turbo(0.05 + 0.9 * ((i * 0.618034) % 1.0)) for i in range(n)]

