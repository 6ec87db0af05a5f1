"""Galleries: every tile names its training sample, and the outlier note appears only with outliers."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.colors import to_hex

from retrac import viz
from retrac.datasets import ImageDataset


def _dataset(ids: tuple[str, ...], groups: tuple[str, ...] | None = None) -> ImageDataset:
    images = torch.linspace(-1, 1, len(ids)).reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return ImageDataset(images, ids, "tiles", groups)


def _titles(figure) -> list[str]:
    return [axis.get_title() for axis in figure.axes if axis.get_title()]


def test_each_tile_is_titled_with_its_sample_id_and_score() -> None:
    train = _dataset(("cats/0001.png", "dogs/0084.png", "a-very-long-folder/and-a-long-name.png", "$x$.png"))
    queries = _dataset(("q0", "q1"))
    rankings = {"tracin": (np.array([[1, 2], [3, 0]]), np.array([[0.5, 0.25], [2.0, 1.0]]))}
    figure = viz.gallery_figure(queries, rankings, train)
    assert _titles(figure) == [
        "q0", "dogs/0084.png\n0.5", "…a-long-name.png\n0.25",
        "q1", r"\$x\$.png" + "\n2", "cats/0001.png\n1",
    ]
    assert not any("red frame" in text.get_text() for text in figure.texts)  # no groups: no outlier note


def test_the_outlier_note_appears_only_when_the_data_has_outliers(tmp_path) -> None:
    queries = _dataset(("q",))
    rankings = {"retrac": (np.array([[0, 1]]), np.array([[1.0, 0.5]]))}
    notes = {}
    for groups in [("majority", "outlier", "majority"), ("cats", "dogs", "cats")]:
        figure = viz.gallery_figure(queries, rankings, _dataset(("a", "b", "c"), groups))
        notes[groups[1]] = [t.get_text() for t in figure.texts if "red frame" in t.get_text()]
        edges = [to_hex(axis.spines["top"].get_edgecolor()) for axis in figure.axes[2:]]  # the two tiles
        assert edges == [
            to_hex("lightgrey"),
            to_hex(viz.HIGHLIGHT if groups[1] == "outlier" else "lightgrey"),
        ]
    assert notes == {"outlier": ["red frame: training sample of group 'outlier'"], "dogs": []}
    path = viz.gallery(tmp_path / "g.png", queries, rankings, _dataset(("a", "b", "c")))
    assert path.read_bytes()[:4] == b"\x89PNG"
