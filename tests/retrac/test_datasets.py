"""Tests of retrac.datasets: every source, the shared conversion, ids, fingerprints, confinement, mixtures."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_digits

from api_schemas.common import SAMPLE_ID_PATTERN
from api_schemas.specs import DatasetSpec
from retrac.datasets import (
    MAX_IMAGE_SIDE,
    Conversions,
    ImageDataset,
    load_dataset,
    load_image_file,
    outlier_mixture,
    split_holdout,
)
from retrac.exceptions import DatasetError, SpecError

torch.set_num_threads(1)

SAMPLE_ID = re.compile(SAMPLE_ID_PATTERN)


def _png(array: np.ndarray, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _load(source: str, **fields: object) -> ImageDataset:
    return load_dataset(DatasetSpec(source=source, **fields))


# --- built-in sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("source", ["builtin:digits", "builtin:digits:0", "builtin:faces", "builtin:patches",
                                    "builtin:outliers"])
def test_builtin_shapes_ranges_and_ids(source: str, channels: int) -> None:
    dataset = _load(source, resolution=16, channels=channels, limit=30)
    assert dataset.images.shape == (30, channels, 16, 16)
    assert dataset.images.dtype == torch.float32
    assert dataset.images.min() >= -1
    assert dataset.images.max() <= 1
    assert dataset.images.std() > 0.05
    assert len(set(dataset.ids)) == 30
    assert all(SAMPLE_ID.fullmatch(i) for i in dataset.ids)
    again = _load(source, resolution=16, channels=channels, limit=30)
    assert again.ids == dataset.ids
    assert again.fingerprint == dataset.fingerprint


def test_digits_match_sklearn_without_resize_and_bilinear_with() -> None:
    digits = load_digits()
    expected = torch.from_numpy(digits.images / 16.0).float()[:, None] * 2 - 1
    native = _load("builtin:digits", resolution=8)
    assert len(native) == 1797
    torch.testing.assert_close(native.images, expected)
    assert native.ids[:2] == (f"digit-0000-{digits.target[0]}", f"digit-0001-{digits.target[1]}")
    assert native.groups is None
    upsampled = _load("builtin:digits", resolution=32, limit=5)
    reference = F.interpolate((expected[:5] + 1) / 2, size=32, mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(upsampled.images, reference)


def test_digit_class_filter() -> None:
    zeros = _load("builtin:digits:0", resolution=8)
    assert len(zeros) == int((load_digits().target == 0).sum())
    assert all(i.endswith("-0") for i in zeros.ids)
    with pytest.raises(DatasetError, match="builtin:digits:x"):
        _load("builtin:digits:x")


def test_constant_image_stays_constant_when_upsampled(tmp_path: Path) -> None:
    path = tmp_path / "flat.npy"
    np.save(path, np.full((2, 8, 8), 0.25, dtype=np.float32))
    dataset = load_dataset(DatasetSpec(source=str(path), resolution=32))
    torch.testing.assert_close(dataset.images, torch.full((2, 1, 32, 32), -0.5))


def test_downsampling_averages_instead_of_sampling() -> None:
    noise = np.random.default_rng(11).random((64, 64)).astype(np.float32)  # std 0.29
    small = load_image_file(_npy(noise), resolution=8, channels=1)
    assert ((small + 1) / 2).std() < 0.1  # antialiased: each output pixel averages many inputs
    torch.testing.assert_close(small.mean(), torch.tensor(noise.mean() * 2 - 1), atol=0.02, rtol=0)


def test_faces_match_skimage() -> None:
    faces = _load("builtin:faces", resolution=25, channels=3)
    assert len(faces) == 200
    assert faces.ids[0] == "face-000"
    expected = torch.from_numpy(skdata.lfw_subset()).float() * 2 - 1
    for channel in range(3):
        torch.testing.assert_close(faces.images[:, channel], expected)


def test_patches_grey_is_luminance_of_rgb_and_seed_matters() -> None:
    rgb = _load("builtin:patches", resolution=8, channels=3, limit=200, seed=3)
    grey = _load("builtin:patches", resolution=8, channels=1, limit=200, seed=3)
    assert rgb.ids == grey.ids
    luminance = torch.einsum("nchw,c->nhw", rgb.images, torch.tensor([0.299, 0.587, 0.114]))
    torch.testing.assert_close(grey.images[:, 0], luminance, atol=1e-5, rtol=0)
    assert len({i.split("-")[1] for i in rgb.ids}) > 3  # patches come from several photos
    other = _load("builtin:patches", resolution=8, channels=1, limit=200, seed=4)
    assert other.fingerprint != grey.fingerprint
    assert len(_load("builtin:patches", resolution=4)) == 2000


def test_builtin_outliers_default_mixture() -> None:
    mixture = _load("builtin:outliers", resolution=8, limit=100, seed=1)
    assert mixture.groups is not None
    assert mixture.groups.count("outlier") == 4
    assert all(i.startswith("out-digit-") and i.endswith("-0")
               for i, g in zip(mixture.ids, mixture.groups, strict=True) if g == "outlier")
    assert all(
        i.startswith("maj-patch-")
        for i, g in zip(mixture.ids, mixture.groups, strict=True)
        if g == "majority"
    )
    assert _load("builtin:outliers", resolution=8, limit=10).groups.count("outlier") == 1


def test_unknown_sources_list_accepted_forms(tmp_path: Path) -> None:
    for source in ["builtin:mnist", "builtin:faces:1", str(tmp_path / "missing.npy")]:
        with pytest.raises(DatasetError, match="builtin:digits"):
            _load(source)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="not a supported source"):
        _load(str(tmp_path / "notes.txt"))


# --- ImageDataset ---------------------------------------------------------------------------------------


def _tiny(values: list[float], ids: tuple[str, ...] | None = None) -> ImageDataset:
    images = torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1, 1).repeat(1, 1, 2, 2)
    return ImageDataset(images, ids or tuple(f"s{i}" for i in range(len(values))), "tiny")


def test_fingerprint_tracks_pixels_ids_and_groups() -> None:
    base = _tiny([0.0, 0.5, -0.5])
    assert base.fingerprint == _tiny([0.0, 0.5, -0.5]).fingerprint
    assert len(base.fingerprint) == 64
    changed_pixel = base.images.clone()
    changed_pixel[1, 0, 1, 1] = 0.25
    assert ImageDataset(changed_pixel, base.ids, "tiny").fingerprint != base.fingerprint
    assert _tiny([0.0, 0.5, -0.5], ("s0", "s1", "x2")).fingerprint != base.fingerprint
    grouped = ImageDataset(base.images, base.ids, "tiny", ("a", "a", "b"))
    assert grouped.fingerprint != base.fingerprint


def test_subset_index_of_and_bad_ids() -> None:
    dataset = _tiny([0.0, 0.1, 0.2, 0.3])
    part = dataset.subset([3, 1])
    assert part.ids == ("s3", "s1")
    torch.testing.assert_close(part.images[:, 0, 0, 0], torch.tensor([0.3, 0.1]))
    assert dataset.index_of(["s2", "s0"]) == [2, 0]
    with pytest.raises(DatasetError, match="nope"):
        dataset.index_of(["s1", "nope"])
    with pytest.raises(DatasetError, match="out of range"):
        dataset.subset([4])
    assert _tiny([0.0, 0.1], ("2/0084.png", "my photos/é.png")).ids == ("2/0084.png", "my photos/é.png")
    for bad_ids in [("a", "a"), ("a/../b", "c"), ("..", "c"), ("/a", "c"), ("a//b", "c"), ("a\\b", "c"),
                    ("a\nb", "c"), ("", "c"), ("a/", "c"), ("x" * 1025, "c")]:
        with pytest.raises(DatasetError, match="sample ids must be relative paths|duplicate ids"):
            _tiny([0.0, 0.1], bad_ids)


def test_to_uint8_shapes() -> None:
    grey = _tiny([-1.0, 1.0])
    assert grey.to_uint8(1).shape == (2, 2)
    assert grey.to_uint8(1).dtype == np.uint8
    assert grey.to_uint8(0).max() == 0
    assert grey.to_uint8(1).min() == 255
    rgb = ImageDataset(torch.zeros(1, 3, 4, 4), ("a",), "rgb")
    assert rgb.to_uint8(0).shape == (4, 4, 3)
    assert int(rgb.to_uint8(0)[0, 0, 0]) == 128


# --- image folders and arrays ---------------------------------------------------------------------------


def _pattern(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_image_folder_modes_groups_and_ids(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "cats").mkdir(parents=True)
    (folder / "dogs" / "deep").mkdir(parents=True)
    rgb = _pattern(0, (8, 8, 3))
    (folder / "cats" / "a rgb.png").write_bytes(_png(rgb))
    rgba = _pattern(1, (8, 8, 4))
    (folder / "cats" / "b.png").write_bytes(_png(rgba))
    palette = Image.fromarray(_pattern(2, (8, 8)) % 4, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 756)
    palette.save(folder / "dogs" / "c.png")
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    (folder / "dogs" / "deep" / "d.png").write_bytes(_png(grey16))
    smooth = np.tile(np.linspace(0, 255, 12, dtype=np.uint8), (8, 1))
    Image.fromarray(np.stack([smooth] * 3, axis=-1)).save(folder / "dogs" / "e.JPG", quality=95)
    (folder / "dogs" / "notes.txt").write_text("not an image")
    (folder / "dogs" / ".hidden.png").write_bytes(_png(rgb))

    dataset = load_dataset(DatasetSpec(source="data", resolution=8, channels=3), root=tmp_path)
    assert dataset.ids == ("cats/a rgb.png", "cats/b.png", "dogs/c.png", "dogs/deep/d.png", "dogs/e.JPG")
    assert dataset.groups == ("cats", "cats", "dogs", "dogs", "dogs")
    unit = (dataset.images + 1) / 2
    torch.testing.assert_close(unit[0], torch.from_numpy(rgb).permute(2, 0, 1) / 255.0)
    premultiplied = rgba[..., :3] / 255.0 * (rgba[..., 3:] / 255.0)
    torch.testing.assert_close(unit[1], torch.from_numpy(premultiplied).float().permute(2, 0, 1))
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]]) / 255.0
    expected_palette = colours[_pattern(2, (8, 8)) % 4]
    torch.testing.assert_close(unit[2], torch.from_numpy(expected_palette).float().permute(2, 0, 1))
    for channel in range(3):
        torch.testing.assert_close(unit[3, channel], torch.from_numpy(grey16 / 65535.0).float())
    cropped = smooth[:, 2:10] / 255.0  # 8x12 center-cropped to the middle 8 columns
    assert (unit[4, 0] - torch.from_numpy(cropped).float()).abs().max() < 0.05
    assert np.array_equal(dataset.to_uint8(0), rgb)

    limited = load_dataset(DatasetSpec(source=str(folder / "dogs"), resolution=4, limit=2))
    assert limited.ids == ("c.png", "deep/d.png")
    assert limited.groups is None
    assert limited.images.shape == (2, 1, 4, 4)


def test_image_folder_reads_every_listed_format(tmp_path: Path) -> None:
    grey = _pattern(10, (4, 4))
    for suffix in ("bmp", "gif", "tiff", "webp"):
        Image.fromarray(grey).save(
            tmp_path / f"x.{suffix}", **({"lossless": True} if suffix == "webp" else {})
        )
    np.save(tmp_path / "x.npy", grey)
    dataset = load_dataset(DatasetSpec(source=str(tmp_path), resolution=4))
    assert dataset.ids == ("x.bmp", "x.gif", "x.npy", "x.tiff", "x.webp")
    for row in range(len(dataset)):
        assert np.array_equal(dataset.to_uint8(row), grey), dataset.ids[row]


def test_npy_layouts_round_trip(tmp_path: Path) -> None:
    hw = _pattern(3, (5, 6, 6))
    np.save(tmp_path / "hw.npy", hw)
    dataset = load_dataset(DatasetSpec(source="hw.npy", resolution=6, limit=3), root=tmp_path)
    assert dataset.ids == ("sample-00000", "sample-00001", "sample-00002")
    torch.testing.assert_close((dataset.images[:, 0] + 1) / 2, torch.from_numpy(hw[:3] / 255.0).float())

    hwc = np.random.default_rng(4).random((2, 6, 10, 3)).astype(np.float32)  # non-square: center crop
    chw = hwc.transpose(0, 3, 1, 2).copy()
    for name, array in [("hwc.npy", hwc), ("chw.npy", chw)]:
        np.save(tmp_path / name, array)
        loaded = load_dataset(DatasetSpec(source=name, resolution=6, channels=3), root=tmp_path)
        expected = torch.from_numpy(hwc[:, :, 2:8]).permute(0, 3, 1, 2) * 2 - 1
        torch.testing.assert_close(loaded.images, expected)


def test_npz_keeps_ids_and_groups(tmp_path: Path) -> None:
    images = _pattern(5, (4, 8, 8))
    ids = np.array(["w", "x", "y", "z"])
    groups = np.array(["majority", "outlier", "majority", "majority"])
    np.savez(tmp_path / "set.npz", images=images, ids=ids, groups=groups)
    dataset = load_dataset(DatasetSpec(source="set.npz", resolution=8, limit=3), root=tmp_path)
    assert dataset.ids == ("w", "x", "y")
    assert dataset.groups == ("majority", "outlier", "majority")
    assert np.array_equal(dataset.to_uint8(1), images[1])
    np.savez(tmp_path / "no_images.npz", pixels=images)
    np.savez(tmp_path / "pickled.npz", images=images, ids=np.array(["a", 1, None], dtype=object))
    np.savez(tmp_path / "short_ids.npz", images=images, ids=ids[:2])
    for name in ["no_images.npz", "pickled.npz", "short_ids.npz"]:
        with pytest.raises(DatasetError):
            load_dataset(DatasetSpec(source=name), root=tmp_path)


@pytest.mark.parametrize("array", [np.full((2, 4, 4), np.nan, dtype=np.float32),
                                   np.full((2, 4, 4), 1.5, dtype=np.float32),
                                   np.zeros((2, 4, 4), dtype=np.int64),
                                   np.zeros((2, 4, 4, 2), dtype=np.uint8)])
def test_bad_arrays_rejected(tmp_path: Path, array: np.ndarray) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DatasetError):
        load_dataset(DatasetSpec(source=str(tmp_path / "bad.npy")))


def test_root_confinement(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    np.save(outside / "x.npy", _pattern(6, (2, 4, 4)))
    np.save(root / "inner" / "ok.npy", _pattern(6, (2, 4, 4)))
    (root / "link.npy").symlink_to(outside / "x.npy")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (outside / "img.png").write_bytes(_png(_pattern(7, (4, 4))))
    (root / "inner" / "escape.png").symlink_to(outside / "img.png")
    assert len(load_dataset(DatasetSpec(source="inner/ok.npy", resolution=4), root=root)) == 2
    for source in ["../outside/x.npy", str(outside / "x.npy"), "link.npy", "linkdir", "inner"]:
        with pytest.raises(SpecError, match="leaves the configured root"):
            load_dataset(DatasetSpec(source=source, resolution=4), root=root)


# --- single images ---------------------------------------------------------------------------------------


def test_load_image_file_good_inputs(tmp_path: Path) -> None:
    grey = _pattern(8, (6, 6))
    from_png = load_image_file(_png(grey), resolution=6, channels=1)
    torch.testing.assert_close((from_png[0] + 1) / 2, torch.from_numpy(grey / 255.0).float())
    chw = np.random.default_rng(9).random((3, 6, 6)).astype(np.float32)
    (tmp_path / "q.npy").write_bytes(_npy(chw))
    from_file = load_image_file(tmp_path / "q.npy", resolution=6, channels=3)
    torch.testing.assert_close(from_file, torch.from_numpy(chw) * 2 - 1)
    assert load_image_file(_npy(grey), resolution=12, channels=3).shape == (3, 12, 12)


def _truncated_png() -> bytes:
    encoded = _png(_pattern(10, (32, 32, 3)))
    return encoded[: len(encoded) // 2]


def _oversized_png_header() -> bytes:
    """A 5000x10 PNG cut inside its pixel data: only a size check before decoding names the limit."""
    encoded = _png(np.zeros((10, 5000), dtype=np.uint8))
    return encoded[: encoded.index(b"IDAT") + 8]


@pytest.mark.parametrize(("payload", "message"), [
    (b"definitely not an image", "not a readable image"),
    (_truncated_png(), "not a readable image"),
    (b"", "empty"),
    (_npy(np.full((4, 4), np.nan, dtype=np.float32)), "NaN"),
    (_npy(np.zeros((4, 4, 2), dtype=np.uint8)), "channel"),
    (_npy(np.zeros((4, 4, 5), dtype=np.uint8)), "channel"),
    (_oversized_png_header(), str(MAX_IMAGE_SIDE)),
    (_png(np.zeros((10, 5000), dtype=np.uint8)), str(MAX_IMAGE_SIDE)),
    (_npy(np.zeros((5000, 10), dtype=np.uint8)), str(MAX_IMAGE_SIDE)),
])
def test_load_image_file_rejects_bad_inputs(payload: bytes, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_image_file(payload, resolution=8, channels=1)


# --- mixtures and splits ---------------------------------------------------------------------------------


def test_outlier_mixture_counts_groups_and_seeds() -> None:
    majority = _load("builtin:patches", resolution=8, limit=60)
    zeros = _load("builtin:digits:0", resolution=8)
    mixture = outlier_mixture(majority, zeros, n_majority=40, n_outliers=5, seed=0)
    assert len(mixture) == 45
    assert mixture.groups.count("outlier") == 5
    assert mixture.groups.count("majority") == 40
    for sample_id, group, image in zip(mixture.ids, mixture.groups, mixture.images, strict=True):
        prefix, source = ("out-", zeros) if group == "outlier" else ("maj-", majority)
        assert sample_id.startswith(prefix)
        torch.testing.assert_close(image, source.images[source.index_of([sample_id[4:]])[0]])
    same = outlier_mixture(majority, zeros, n_majority=40, n_outliers=5, seed=0)
    assert same.ids == mixture.ids
    assert same.fingerprint == mixture.fingerprint
    other = outlier_mixture(majority, zeros, n_majority=40, n_outliers=5, seed=1)
    assert other.ids != mixture.ids
    with pytest.raises(DatasetError, match="cannot pick"):
        outlier_mixture(majority, zeros, n_majority=61, n_outliers=5, seed=0)


def test_split_holdout_disjoint_and_covering() -> None:
    dataset = _load("builtin:digits", resolution=8, limit=50)
    train, held = split_holdout(dataset, 12, seed=5)
    assert len(train) == 38
    assert len(held) == 12
    assert set(train.ids).isdisjoint(held.ids)
    assert set(train.ids) | set(held.ids) == set(dataset.ids)
    assert split_holdout(dataset, 12, seed=5)[1].ids == held.ids
    assert split_holdout(dataset, 12, seed=6)[1].ids != held.ids
    with pytest.raises(DatasetError):
        split_holdout(dataset, 51, seed=0)


def test_npz_integer_group_labels_are_accepted(tmp_path) -> None:
    import numpy as np

    from api_schemas import DatasetSpec
    from retrac.datasets import load_dataset

    np.savez(tmp_path / "d.npz", images=np.zeros((3, 4, 4), dtype=np.uint8), groups=np.array([0, 1, 1]))
    dataset = load_dataset(DatasetSpec(source=str(tmp_path / "d.npz"), resolution=4))
    assert dataset.groups == ("0", "1", "1")


def test_class_labels_from_subfolders_npz_and_digits(tmp_path: Path) -> None:
    """Sorted class names numbered 0..n-1 (from every sample, so a limit never renumbers), integers as
    given."""
    for name in ("dog", "ant", "cat"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "0.png").write_bytes(_png(_pattern(0, (4, 4))))
    folder = load_dataset(DatasetSpec(source="data", resolution=4), root=tmp_path)
    assert folder.classes is not None
    assert dict(folder.classes.classes) == {"ant": 0, "cat": 1, "dog": 2}
    assert folder.labels == (0, 1, 2)
    limited = load_dataset(DatasetSpec(source="data", resolution=4, limit=2), root=tmp_path)
    assert limited.labels == (0, 1)
    assert limited.classes == folder.classes
    assert limited.subset([1]).labels == (1,)
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "ints.npz", images=images, labels=np.array([7, 3, 7]))
    ints = load_dataset(DatasetSpec(source=str(tmp_path / "ints.npz"), resolution=4))
    assert ints.labels == (7, 3, 7)
    assert dict(ints.classes.classes) == {"3": 3, "7": 7}
    np.savez(tmp_path / "names.npz", images=images, labels=np.array(["zebra", "yak", "zebra"]))
    names = load_dataset(DatasetSpec(source=str(tmp_path / "names.npz"), resolution=4))
    assert names.labels == (1, 0, 1)
    assert dict(names.classes.classes) == {"yak": 0, "zebra": 1}
    np.savez(tmp_path / "negative.npz", images=images, labels=np.array([0, -1, 2]))
    with pytest.raises(DatasetError, match="'labels' must be non-negative integers"):
        load_dataset(DatasetSpec(source=str(tmp_path / "negative.npz"), resolution=4))
    digits = load_dataset(DatasetSpec(source="builtin:digits", resolution=8, limit=12))
    assert digits.labels == tuple(load_digits().target[:12].tolist())
    assert _load("builtin:faces", resolution=8, limit=2).labels is None  # no classes: nothing to condition on


# --- notices of what loading converted --------------------------------------------------------------------


def test_notices_count_each_conversion_once_per_load(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(_pattern(11, (8, 8))))  # grey uint8 at 8 px: as it is
    (folder / "b.png").write_bytes(_png(_pattern(12, (8, 8, 4))))  # RGBA: alpha, and RGB to grey
    (folder / "c.png").write_bytes(_png(_pattern(13, (8, 12))))  # 12 wide, 8 high: cropped
    (folder / "d.png").write_bytes(_png(_pattern(14, (16, 16))))  # resized
    (folder / "e.png").write_bytes(_png(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))  # 16-bit
    dataset = load_dataset(DatasetSpec(source=str(folder), resolution=8))
    assert dataset.notices == (
        "mixed: 1 of 5 had their transparency composited onto black",
        "mixed: 1 of 5 converted from RGB to grey (ITU-R BT.601 luma)",
        "mixed: 1 of 5 center-cropped from 12x8 to 8x8 (width x height)",
        "mixed: 1 of 5 resized from 16x16 to 8x8 px (bilinear)",
        "mixed: 1 of 5 converted from 16-bit grey pixels",
    )
    again = load_dataset(DatasetSpec(source=str(folder), resolution=8))
    assert again.notices == dataset.notices  # counted per load, never accumulated across loads
    np.save(tmp_path / "wide.npy", np.zeros((3, 4, 4), dtype=np.uint16))
    assert load_dataset(DatasetSpec(source=str(tmp_path / "wide.npy"), resolution=4, channels=3)).notices == (
        "wide.npy: 3 of 3 converted from uint16 pixels",
        "wide.npy: 3 of 3 converted from grey to RGB (the channel repeated)",
    )
    assert load_dataset(DatasetSpec(source="builtin:digits", resolution=8, limit=5)).notices == ()


def test_query_image_conversions_are_counted_by_the_caller() -> None:
    conversions = Conversions()
    for side in (6, 12, 12):
        load_image_file(
            _png(_pattern(side, (side, side, 3))), resolution=6, channels=1, conversions=conversions
        )
    assert conversions.notices(3, "query images") == (
        "query images: 3 of 3 converted from RGB to grey (ITU-R BT.601 luma)",
        "query images: 2 of 3 resized from 12x12 to 6x6 px (bilinear)",
    )
