"""PNG figures of attributions and gradient norms (matplotlib, Agg backend: no display needed).

- `gallery`: per query, its top proponents under each method side by side, each with its sample id
  and score; samples of a highlighted group (the planted outliers) get a red frame.
- `norm_scatter`: (training timestep, gradient norm) of every training sample, coloured by group.
- `norm_curve`: norms of a few samples over the whole timestep grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from retrac.datasets import ImageDataset  # noqa: E402

DPI = 100
HIGHLIGHT = "tab:red"
ID_CHARS = 16
"""Characters of a sample id a gallery tile shows (its title is as wide as the tile)."""


def gallery(
    path: str | Path,
    queries: ImageDataset,
    rankings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    train: ImageDataset,
    *,
    query_labels: Sequence[str] | None = None,
    highlight: str | None = "outlier",
) -> Path:
    """`gallery_figure` saved as a PNG at `path`."""
    figure = gallery_figure(queries, rankings, train, query_labels=query_labels, highlight=highlight)
    return _save(figure, path, tight=False)


def gallery_figure(
    queries: ImageDataset,
    rankings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    train: ImageDataset,
    *,
    query_labels: Sequence[str] | None = None,
    highlight: str | None = "outlier",
) -> plt.Figure:
    """One row per query: the query (titled by `query_labels`, default its id), then for each method
    (label -> (positions, scores) `(Q, k)`) its top-k training samples, each titled with its sample id
    and score. Samples of group `highlight` get a red frame, explained by a note only when the
    training data has that group."""
    methods = list(rankings)
    k = rankings[methods[0]][0].shape[1]
    columns = 1 + len(methods) * (k + 1)
    width, height = 0.8 * columns, 1.05 * len(queries) + 0.5
    figure, axes = plt.subplots(len(queries), columns, figsize=(width, height), squeeze=False)
    figure.subplots_adjust(
        left=0.01, right=0.99, top=1 - 0.4 / height, bottom=0.2 / height, wspace=0.1, hspace=0.6
    )
    highlighted = highlight is not None and train.groups is not None and highlight in train.groups
    for q in range(len(queries)):
        label = query_labels[q] if query_labels is not None else queries.ids[q]
        _thumb(axes[q, 0], queries.to_uint8(q), _short(label), frame=None)
        for m, method in enumerate(methods):
            axes[q, 1 + m * (k + 1)].axis("off")  # a blank column between methods
            positions, scores = rankings[method]
            for j in range(k):
                row = int(positions[q, j])
                framed = highlighted and train.groups[row] == highlight  # type: ignore[index]
                _thumb(
                    axes[q, 2 + m * (k + 1) + j],
                    train.to_uint8(row),
                    f"{_short(train.ids[row])}\n{scores[q, j]:.2g}",
                    frame=HIGHLIGHT if framed else None,
                )
    for m, method in enumerate(methods):
        left = axes[0, 2 + m * (k + 1)].get_position().x0
        figure.text(
            left,
            1 - 0.12 / height,
            f"{method}: top {k} proponents (sample id, score)",
            fontsize=9,
            weight="bold",
            va="top",
        )
    if highlighted:
        figure.text(
            0.01,
            0.05 / height,
            f"red frame: training sample of group '{highlight}'",
            fontsize=7,
            color=HIGHLIGHT,
        )
    return figure


def norm_scatter(
    path: str | Path,
    timesteps: np.ndarray,
    norms: np.ndarray,
    groups: Sequence[str] | None,
    *,
    t_max: int | None = None,
    title: str = "",
) -> Path:
    """Scatter of (timestep, norm) `(N,)` per group, with a line at `t_max`."""
    figure, axis = plt.subplots(figsize=(5, 3.4))
    labels = np.asarray(groups if groups is not None else ["all"] * len(norms))
    for group in sorted(set(labels.tolist())):
        chosen = labels == group
        axis.scatter(
            timesteps[chosen],
            norms[chosen],
            s=6,
            alpha=0.6,
            label=f"{group} ({chosen.sum()})",
            color=HIGHLIGHT if group == "outlier" else None,
        )
    if t_max is not None:
        axis.axvline(t_max, color="grey", linestyle=":", label=f"t_max = {t_max}")
    axis.set(xlabel="training timestep t (replayed)", ylabel="gradient norm", title=title)
    axis.legend(fontsize=7)
    return _save(figure, path)


def norm_curve(
    path: str | Path,
    timesteps: np.ndarray,
    curves: Mapping[str, np.ndarray],
    *,
    title: str = "",
    ylabel: str = "gradient norm",
) -> Path:
    """Norm over the timestep grid `(K,)` for each labelled curve `(K,)`."""
    figure, axis = plt.subplots(figsize=(5, 3.4))
    for label, values in curves.items():
        axis.plot(timesteps, values, label=label, linewidth=1.2)
    axis.set(xlabel="timestep t", ylabel=ylabel, title=title)
    axis.legend(fontsize=7)
    return _save(figure, path)


def _short(label: str, most: int = ID_CHARS) -> str:
    """`label` cut to its last `most` characters (a file name's end tells most), `$` kept literal
    (matplotlib would read text between two `$` as math)."""
    cut = label if len(label) <= most else "…" + label[-(most - 1):]
    return cut.replace("$", r"\$")


def _thumb(axis: plt.Axes, pixels: np.ndarray, label: str, *, frame: str | None) -> None:
    axis.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(label, fontsize=6, pad=2)
    for spine in axis.spines.values():  # a thin grey edge keeps white images visible
        spine.set_color(frame or "lightgrey")
        spine.set_linewidth(2.5 if frame else 0.5)


def _save(figure: plt.Figure, path: str | Path, *, tight: bool = True) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        figure.tight_layout()
    figure.savefig(target, dpi=DPI)
    plt.close(figure)
    return target
