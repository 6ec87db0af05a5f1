"""Training images for attribution: built-in data, image folders and arrays, as one tensor with stable ids.

Every source goes through the same conversion (channel layout, center crop to square, values to [0, 1],
channel count, resize, then x = 2z - 1), so an image gets the same pixels whether it is a training sample
or a query. Ids are stable across loads, because the gradient store keys its rows by them and a stale
store is detected through the dataset's fingerprint. An image folder's ids are its files' relative
paths (`2/0084.png`), so an answer names the file it came from.

Class labels, for class-conditional models, come with the source: an image folder whose every image
lies in a class subfolder (`train/<class>/...`: sorted class names numbered 0..n-1), an `.npz` with a
`labels` array (integers kept as given, or names numbered in sorted order), and `builtin:digits` (the
digit). A dataset's `classes` is that mapping (`retrac.conditions.ClassLabels`).

Captions, for text-conditional models, come as Hugging Face's `imagefolder` gives them: a
`metadata.jsonl` at the folder's top, one JSON object per line with the image's `file_name` (relative to
the folder) and its caption in the column `DatasetSpec.caption_column` (default `text`); or a
`captions` string array in an `.npz`. Every kept image needs its caption, once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
import struct
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from api_schemas.common import MAX_SAMPLE_ID_LENGTH, SAMPLE_ID_PATTERN
from api_schemas.specs import DatasetSpec
from retrac.conditions import ClassLabels
from retrac.exceptions import DatasetError
from retrac.paths import resolve_inside

METADATA_NAME = "metadata.jsonl"
MAX_METADATA_BYTES = 256 << 20
"""Largest metadata.jsonl read (captions of about a million images)."""
MAX_IMAGE_SIDE = 4096
"""Largest accepted image side, checked before pixels are decoded (guards against decompression bombs)."""

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".npy"})
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")  # no EPS/PDF: those run external programs
_SAMPLE_ID = re.compile(SAMPLE_ID_PATTERN)
_OLD_ID_CHAR = re.compile(r"[^A-Za-z0-9._-]")
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights of PIL's convert("L")
_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "coins", "moon", "page", "text", "rocket", "horse")
_IN_MEMORY = re.compile(
    r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>"
)  # PIL names its file object; say nothing of it
_CHUNK = 256  # images converted at once: bounds the float copy of a large array
_SOURCES = (
    "builtin:digits, builtin:digits:<0-9>, builtin:faces, builtin:patches, builtin:outliers, "
    "an image folder, or a .npy/.npz file"
)


@dataclass
class Conversions:
    """What the conversion path changed in the images of one load (a dataset, or one request's
    queries), counted per kind, so that a user learns their images were not used as they are."""

    counts: Counter[str] = field(default_factory=Counter)

    def note(self, kind: str, count: int) -> None:
        """`count` images underwent `kind` (a phrase such as "resized from 28x28 to 16x16 px")."""
        if count:
            self.counts[kind] += count

    def notices(self, total: int, what: str) -> tuple[str, ...]:
        """One sentence per kind, e.g. "training images: 48 of 48 resized from 28x28 to 16x16 px"."""
        return tuple(f"{what}: {n} of {total} {kind}" for kind, n in self.counts.items())


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Training images (N, C, H, W) in [-1, 1] with one unique id per sample (a relative path, see
    `api_schemas.common.SAMPLE_ID_PATTERN`), and the notices of what loading them converted.

    Treat `images` as read-only: the fingerprint is computed once and cached.
    """

    images: torch.Tensor
    ids: tuple[str, ...]
    name: str
    groups: tuple[str, ...] | None = None
    notices: tuple[str, ...] = ()
    labels: tuple[int, ...] | None = None
    classes: ClassLabels | None = None
    captions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise DatasetError(f"images must be a float32 (N, C, H, W) tensor, got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        count = self.images.shape[0]
        if len(self.ids) != count:
            raise DatasetError(f"{len(self.ids)} ids for {count} images")
        bad = [i for i in self.ids if not _SAMPLE_ID.fullmatch(i) or len(i) > MAX_SAMPLE_ID_LENGTH]
        if bad:
            raise DatasetError(
                f"sample ids must be relative paths of at most {MAX_SAMPLE_ID_LENGTH} characters (parts "
                "joined by '/', none empty or only dots, no backslash or control characters); rename: "
                f"{bad[:5]}"
            )
        if len(set(self.ids)) != count:
            repeated = sorted(i for i, n in Counter(self.ids).items() if n > 1)
            raise DatasetError(f"duplicate ids in {self.name!r}: {repeated[:5]}")
        if self.groups is not None and len(self.groups) != count:
            raise DatasetError(f"{len(self.groups)} group labels for {count} images")
        if (self.labels is None) != (self.classes is None):
            raise DatasetError("class labels need their mapping (classes), and a mapping needs labels")
        if self.labels is not None and self.classes is not None:
            if len(self.labels) != count:
                raise DatasetError(f"{len(self.labels)} class labels for {count} images")
            unknown = set(self.labels) - set(self.classes.classes.values())
            if unknown:
                raise DatasetError(f"class labels {sorted(unknown)[:5]} are not in the dataset's classes")
        if self.captions is not None and len(self.captions) != count:
            raise DatasetError(f"{len(self.captions)} captions for {count} images")

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of shape, pixels, ids and groups: a store built from other data can be told apart."""
        header = {"shape": list(self.images.shape), "dtype": "float32", "ids": list(self.ids),
                  "groups": None if self.groups is None else list(self.groups)}
        digest = hashlib.sha256(json.dumps(header).encode())
        digest.update(np.ascontiguousarray(self.images.detach().cpu().numpy(), dtype=np.float32).data)
        return digest.hexdigest()

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        return {sample_id: i for i, sample_id in enumerate(self.ids)}

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """The samples at `indices`, in that order, keeping their ids and groups."""
        index = [int(i) for i in indices]
        outside = [i for i in index if not 0 <= i < len(self)]
        if outside:
            raise DatasetError(f"indices {outside[:5]} out of range for {len(self)} samples")
        groups = None if self.groups is None else tuple(self.groups[i] for i in index)
        labels = None if self.labels is None else tuple(self.labels[i] for i in index)
        captions = None if self.captions is None else tuple(self.captions[i] for i in index)
        return ImageDataset(
            self.images[torch.tensor(index, dtype=torch.long)],
            tuple(self.ids[i] for i in index),
            self.name,
            groups,
            labels=labels,
            classes=self.classes,
            captions=captions,
        )

    def index_of(self, sample_ids: Iterable[str]) -> list[int]:
        """Positions of the given ids, so callers can address samples by their stable names."""
        wanted = list(sample_ids)
        unknown = [i for i in wanted if i not in self._positions]
        if unknown:
            raise DatasetError(f"unknown sample ids in {self.name!r}: {unknown[:10]}")
        return [self._positions[i] for i in wanted]

    def to_uint8(self, index: int) -> np.ndarray:
        """Sample `index` as (H, W) or (H, W, 3) uint8, ready for PNG export."""
        pixels = ((self.images[index].detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = pixels.permute(1, 2, 0).numpy()
        return array[:, :, 0] if array.shape[2] == 1 else array


def load_dataset(spec: DatasetSpec, root: Path | None = None) -> ImageDataset:
    """Load `spec.source`, keep its first `spec.limit` samples, shaped (channels, resolution, resolution).

    With `root`, file and folder sources must resolve inside it (relative ones resolve against it), so a
    request cannot read files elsewhere on the machine.
    """
    if spec.source.startswith("builtin:"):
        return _load_builtin(spec)
    path = resolve_inside(root, spec.source)
    if path.is_dir():
        return _load_folder(path, spec, root)
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        return _load_array_file(path, spec)
    problem = "not found" if not path.exists() else "not a supported source"
    raise DatasetError(f"dataset source {spec.source!r} {problem}; expected {_SOURCES}")


def load_image_file(
    data: bytes | Path,
    *,
    resolution: int,
    channels: int,
    max_side: int = MAX_IMAGE_SIDE,
    conversions: Conversions | None = None,
) -> torch.Tensor:
    """One image file or its bytes (PNG, JPEG, ... or .npy) as (channels, resolution, resolution) in [-1, 1].

    A side over `max_side` is refused from the declared size, before any pixel is decoded (a .npy's
    allocation is bounded by its bytes), so what one image costs in memory is bounded by `max_side`.
    What was converted is counted in `conversions`, when given."""
    conversions = conversions if conversions is not None else Conversions()
    where = str(data) if isinstance(data, Path) else "image bytes"
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read {where}: {exc}") from exc
    if not data:
        raise DatasetError(f"{where} is empty")
    if data.startswith(b"\x93NUMPY"):
        array = _read_npy(data, where)
    else:
        array = _decode_image(data, where, max_side, conversions)
    return _to_tensor(
        array, batched=False, resolution=resolution, channels=channels, where=where, max_side=max_side,
        conversions=conversions,
    )[0]


def old_sample_ids(sample_ids: Sequence[str]) -> tuple[str, ...]:
    """The ids earlier versions gave the same samples (every character outside `A-Za-z0-9._-`, '/'
    included, replaced by '_'): to recognise runs and stores made before ids kept folder paths."""
    return tuple(_OLD_ID_CHAR.sub("_", i) for i in sample_ids)


def outlier_mixture(majority: ImageDataset, outliers: ImageDataset, *, n_majority: int, n_outliers: int,
                    seed: int) -> ImageDataset:
    """A training set with planted outliers: the ground truth that attribution should recover."""
    if majority.images.shape[1:] != outliers.images.shape[1:]:
        raise DatasetError(f"image shapes differ: {tuple(majority.images.shape[1:])} vs "
                           f"{tuple(outliers.images.shape[1:])}")
    rng = np.random.default_rng(seed)
    picked = []
    for part, count, prefix in ((majority, n_majority, "maj-"), (outliers, n_outliers, "out-")):
        if not 0 <= count <= len(part):
            raise DatasetError(f"cannot pick {count} samples from {part.name!r}, which has {len(part)}")
        chosen = part.subset(rng.choice(len(part), size=count, replace=False).tolist())
        picked.append(replace(chosen, ids=tuple(prefix + i for i in chosen.ids)))
    together = ImageDataset(torch.cat([p.images for p in picked]), picked[0].ids + picked[1].ids,
                            f"{majority.name} + {outliers.name}",
                            ("majority",) * n_majority + ("outlier",) * n_outliers)
    return together.subset(rng.permutation(len(together)).tolist())


def split_holdout(dataset: ImageDataset, n_holdout: int, *, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, held-out): a seeded, disjoint split; both keep the original sample order."""
    if not 0 <= n_holdout <= len(dataset):
        raise DatasetError(f"cannot hold out {n_holdout} of {len(dataset)} samples")
    order = np.random.default_rng(seed).permutation(len(dataset))
    return dataset.subset(np.sort(order[n_holdout:]).tolist()), dataset.subset(
        np.sort(order[:n_holdout]).tolist()
    )


# --- sources ---------------------------------------------------------------------------------------------


def _load_builtin(spec: DatasetSpec) -> ImageDataset:
    name, _, arg = spec.source.removeprefix("builtin:").partition(":")
    if name == "digits" and arg in ("", *map(str, range(10))):
        return _load_digits(spec, arg)
    loaders = {"faces": _load_faces, "patches": _load_patches, "outliers": _load_outliers}
    if name not in loaders or arg:
        raise DatasetError(f"unknown built-in source {spec.source!r}; expected {_SOURCES}")
    return loaders[name](spec)


def _load_digits(spec: DatasetSpec, label: str) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero(digits.target == int(label)) if label else np.arange(len(digits.target))
    ids = tuple(f"digit-{i:04d}-{digits.target[i]}" for i in keep)
    pixels = (digits.images[keep] / 16.0).astype(np.float32)  # exact: 0..16 / 16; float32 needs no notice
    return _array_dataset(pixels, ids, None, spec, spec.source, labels=digits.target[keep])


def _load_faces(spec: DatasetSpec) -> ImageDataset:
    from skimage import data

    faces = data.lfw_subset()
    ids = tuple(f"face-{i:03d}" for i in range(len(faces)))
    return _array_dataset(
        faces.astype(np.float32), ids, None, spec, spec.source
    )  # the float32 it becomes anyway


def _load_patches(spec: DatasetSpec) -> ImageDataset:
    side = 2 * spec.resolution
    photos = [(name, photo) for name, photo in _photos() if min(photo.shape[:2]) >= side]
    if not photos:
        raise DatasetError(f"no bundled photo has {side} px on a side; use a smaller resolution")
    count = spec.limit or 2000
    rng = np.random.default_rng(spec.seed)
    which = rng.integers(len(photos), size=count)
    ys = rng.integers(0, np.array([p.shape[0] - side + 1 for _, p in photos])[which])
    xs = rng.integers(0, np.array([p.shape[1] - side + 1 for _, p in photos])[which])
    images = torch.empty(count, spec.channels, spec.resolution, spec.resolution)
    conversions = Conversions()
    for k, (name, photo) in enumerate(photos):
        rows = np.flatnonzero(which == k)
        if rows.size:
            cuts = np.stack([photo[y:y + side, x:x + side] for y, x in zip(ys[rows], xs[rows], strict=True)])
            images[torch.from_numpy(rows)] = _to_tensor(
                cuts,
                batched=True,
                resolution=spec.resolution,
                channels=spec.channels,
                where=name,
                conversions=conversions,
            )
    ids = tuple(f"patch-{photos[k][0]}-{i:05d}" for i, k in enumerate(which))
    return ImageDataset(images, ids, spec.source, notices=conversions.notices(count, spec.source))


@functools.cache
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    """The photos that ship inside scikit-image (others would need a download, which is not allowed)."""
    from skimage import data

    loaded = []
    for name in _PHOTOS:
        try:
            photo = getattr(data, name)()
        except (ImportError, OSError, ValueError, AttributeError):
            continue
        photo.setflags(write=False)
        loaded.append((name, photo))
    return tuple(loaded)


def _load_outliers(spec: DatasetSpec) -> ImageDataset:
    total = spec.limit or 1000
    n_outliers = max(1, round(0.04 * total))
    shape: dict[str, Any] = {"resolution": spec.resolution, "channels": spec.channels, "seed": spec.seed}
    majority = load_dataset(DatasetSpec(source="builtin:patches", limit=max(1, total - n_outliers), **shape))
    zeros = load_dataset(DatasetSpec(source="builtin:digits:0", **shape))
    mixture = outlier_mixture(majority, zeros, n_majority=total - n_outliers, n_outliers=n_outliers,
                              seed=spec.seed)
    return replace(mixture, name=spec.source, notices=majority.notices + zeros.notices)


def _load_folder(folder: Path, spec: DatasetSpec, root: Path | None) -> ImageDataset:
    found = _image_files(folder)
    if not found:
        raise DatasetError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in folder {folder}")
    grouped = all("/" in rel for rel in found)  # every image in a class subfolder: the subfolder is its group
    kept = found[:spec.limit]
    conversions = Conversions()
    images = [
        load_image_file(
            resolve_inside(root, folder / rel),
            resolution=spec.resolution,
            channels=spec.channels,
            conversions=conversions,
        )
        for rel in kept
    ]
    ids = tuple(kept)  # the relative paths themselves: an answer names the file
    groups = tuple(rel.split("/", 1)[0] for rel in kept) if grouped else None
    labels, classes = None, None
    if grouped:  # numbered over every file found, so that a limit never renumbers the classes
        labels, classes = _class_labels(np.asarray([rel.split("/", 1)[0] for rel in found]), spec.limit)
    return ImageDataset(
        torch.stack(images),
        ids,
        folder.name,
        groups,
        conversions.notices(len(kept), folder.name),
        labels,
        classes,
        _folder_captions(folder, ids, spec.caption_column, root),
    )


def _folder_captions(
    folder: Path, ids: tuple[str, ...], column: str, root: Path | None
) -> tuple[str, ...] | None:
    """Each image's caption from the folder's metadata.jsonl (module docstring), in `ids` order; None
    without one. A DatasetError for a line that is no JSON object, a missing column, or an image without
    its caption (or with two)."""
    if not (folder / METADATA_NAME).is_file():
        return None
    file = resolve_inside(root, folder / METADATA_NAME)  # a link out of the data root is refused
    if file.stat().st_size > MAX_METADATA_BYTES:
        raise DatasetError(f"{file} is over {MAX_METADATA_BYTES >> 20} MiB; split the dataset")
    found: dict[str, str] = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{file}, line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise DatasetError(f"{file}, line {number}: needs a \"file_name\" string")
        if not isinstance(entry.get(column), str):
            raise DatasetError(
                f"{file}, line {number}: no caption string in column {column!r} (it has {sorted(entry)}); "
                "name the caption column (caption_column, --caption-column)"
            )
        name = Path(entry["file_name"]).as_posix().removeprefix("./")
        if name in found:
            raise DatasetError(f"{file}, line {number}: a second caption for {name}")
        found[name] = entry[column]
    missing = [i for i in ids if i not in found]
    if missing:
        raise DatasetError(
            f"{file} gives no caption to {len(missing)} images, e.g. {missing[:3]}; caption every image"
        )
    return tuple(found[i] for i in ids)


def _image_files(folder: Path) -> list[str]:
    """Relative paths of the images under `folder`, sorted; hidden files and folders are skipped."""
    found = []
    for top, dirs, files in os.walk(folder):  # does not follow symlinked folders
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top, name).relative_to(folder).as_posix() for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in _IMAGE_SUFFIXES]
    return sorted(found)


def _load_array_file(path: Path, spec: DatasetSpec) -> ImageDataset:
    ids = groups = labels = captions = None
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)  # .npy is memory-mapped: `limit` reads less
        if isinstance(loaded, np.ndarray):
            images = loaded
        else:
            with loaded as archive:
                if "images" not in archive.files:
                    raise DatasetError(f"{path} has no 'images' array (it has {archive.files})")
                images = archive["images"]
                if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
                    raise DatasetError(f"{path}: 'images' must be an (N, H, W[, C]) array")
                ids = _strings(archive, "ids", len(images), path)
                groups = _strings(archive, "groups", len(images), path)
                labels = _labels_array(archive, len(images), path)
                captions = _captions_array(archive, len(images), path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read {path} as a .npy/.npz array: {exc}") from exc
    dataset = _array_dataset(images, ids, groups, spec, path.name, labels=labels)
    return dataset if captions is None else replace(dataset, captions=captions[:spec.limit])


def _captions_array(archive: np.lib.npyio.NpzFile, count: int, path: Path) -> tuple[str, ...] | None:
    """The `captions` of an .npz, `(count,)` strings, if it has them."""
    if "captions" not in archive.files:
        return None
    values = archive["captions"]
    if values.dtype.kind not in "US" or values.shape != (count,):
        raise DatasetError(f"{path}: 'captions' must be {count} strings, got {values.dtype} {values.shape}")
    return tuple(values.astype(str).tolist())


def _strings(archive: np.lib.npyio.NpzFile, key: str, count: int, path: Path) -> tuple[str, ...] | None:
    if key not in archive.files:
        return None
    values = archive[key]  # strings, or integers (class labels) written as their decimal text
    if values.dtype.kind not in "USiu" or values.shape != (count,):
        raise DatasetError(
            f"{path}: '{key}' must be {count} strings or integers, got {values.dtype} {values.shape}"
        )
    return tuple(values.astype(str).tolist())


def _labels_array(archive: np.lib.npyio.NpzFile, count: int, path: Path) -> np.ndarray | None:
    """The `labels` of an .npz, `(count,)` non-negative integers or strings (class names), if it has them."""
    if "labels" not in archive.files:
        return None
    values = archive["labels"]
    if values.dtype.kind not in "USiu" or values.shape != (count,):
        raise DatasetError(
            f"{path}: 'labels' must be {count} integers or strings, got {values.dtype} {values.shape}"
        )
    if values.dtype.kind in "iu" and values.size and values.min() < 0:
        raise DatasetError(f"{path}: 'labels' must be non-negative integers, got {values.min()}")
    return values


def _class_labels(values: np.ndarray, kept: int | None) -> tuple[tuple[int, ...], ClassLabels]:
    """The integer labels of the first `kept` samples (all if None) and the mapping, made from every
    sample's label so that a `limit` never renumbers the classes: integers as given (named by their
    decimal text), names numbered 0..n-1 in sorted order (as torchvision's and Hugging Face's image
    folders number them)."""
    if values.dtype.kind in "iu":
        classes = {str(v): int(v) for v in sorted(set(values.tolist()))}
    else:
        values = values.astype(str)
        classes = {name: i for i, name in enumerate(sorted(set(values.tolist())))}
    return tuple(classes[str(v)] for v in values[:kept].tolist()), ClassLabels(classes)


def _array_dataset(array: np.ndarray, ids: tuple[str, ...] | None, groups: tuple[str, ...] | None,
                   spec: DatasetSpec, name: str, *, labels: np.ndarray | None = None) -> ImageDataset:
    if array.ndim not in (3, 4) or len(array) == 0:
        raise DatasetError(f"{name} must hold images as (N, H, W[, C]) or (N, C, H, W), got {array.shape}")
    kept = array[:spec.limit]
    conversions = Conversions()
    images = _to_tensor(kept, batched=True, resolution=spec.resolution, channels=spec.channels, where=name,
                        conversions=conversions)
    ids = ids[:spec.limit] if ids is not None else tuple(f"sample-{i:05d}" for i in range(len(kept)))
    per_sample, classes = _class_labels(labels, spec.limit) if labels is not None else (None, None)
    return ImageDataset(images, ids, name, None if groups is None else groups[:spec.limit],
                        conversions.notices(len(kept), name), per_sample, classes)


# --- decoding and the one conversion path ------------------------------------------------------------------


def _read_npy(data: bytes, where: str) -> np.ndarray:
    """The array of .npy bytes; its header is checked first, so a declared shape larger than the bytes
    sent (or than an image may be) is refused before anything is allocated."""
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"version {version} unsupported; save it with numpy.save")
        shape, _, dtype = readers[version](stream)
        if dtype.hasobject or math.prod(shape) * dtype.itemsize != len(data) - stream.tell():
            raise ValueError(f"its header declares {shape} {dtype}, which the {len(data)} bytes do not hold")
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{where} is not a readable .npy array: {exc}") from exc


def _decode_image(data: bytes, where: str, max_side: int, conversions: Conversions) -> np.ndarray:
    """Pixels as (H, W) or (H, W, 3); alpha is composited onto black. Size is checked before decoding."""
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:
            _check_side(image.size[1], image.size[0], where, max_side)
            image.load()
            if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):  # 16-bit grey, float
                conversions.note(
                    f"converted from {'float' if image.mode == 'F' else '16-bit'} grey pixels", 1
                )
                return np.asarray(image).astype(np.float32) / (1.0 if image.mode == "F" else 65535.0)
            if "A" in image.getbands() or "transparency" in image.info:
                conversions.note("had their transparency composited onto black", 1)
                rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
                return rgba[:, :, :3] * rgba[:, :, 3:]
            if image.mode not in ("L", "RGB"):
                conversions.note(f"converted from PIL mode {image.mode} pixels", 1)
            return np.asarray(image.convert("L" if image.mode in ("1", "L") else "RGB"))
    except UnidentifiedImageError as exc:  # PIL's "cannot identify image file <BytesIO ...>"
        formats = ", ".join(_PIL_FORMATS[:-1])
        raise DatasetError(
            f"{where} is not a readable image: its bytes are no {formats} or {_PIL_FORMATS[-1]} file, "
            "nor a .npy array"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{where} is not a readable image: {_IN_MEMORY.sub('the data', str(exc))}"
        ) from exc


def _check_side(height: int, width: int, where: str, max_side: int) -> None:
    if max(height, width) > max_side:
        raise DatasetError(f"{where} is {width}x{height}; the largest side accepted is {max_side}")


def _to_tensor(array: np.ndarray, *, batched: bool, resolution: int, channels: int, where: str,
               conversions: Conversions, max_side: int = MAX_IMAGE_SIDE) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) (no N when not batched) → (N, channels, R, R) in [-1, 1];
    what is cropped, resized or converted on the way is counted in `conversions`."""
    if channels not in (1, 3) or resolution < 1:
        raise DatasetError(f"cannot bring images to {channels} channels at {resolution} px")
    nchw = _center_crop(_nchw(array if batched else array[None], where, max_side), conversions)
    converted = [_fit(_unit(nchw[i:i + _CHUNK], where, conversions), resolution, channels, conversions)
                 for i in range(0, len(nchw), _CHUNK)]
    return torch.cat(converted)


def _nchw(array: np.ndarray, where: str, max_side: int) -> np.ndarray:
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim != 4:
        raise DatasetError(f"{where}: array of shape {array.shape} is not an image or a stack of images")
    elif array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif array.shape[1] not in (1, 3):
        raise DatasetError(f"{where}: shape {array.shape[1:]} has no channel axis of size 1 or 3 "
                           "(grey or RGB) first or last")
    _check_side(array.shape[2], array.shape[3], where, max_side)
    if 0 in array.shape[2:]:
        raise DatasetError(
            f"{where}: images of shape {array.shape[2:]} have no pixels; send a non-empty image"
        )
    return array


def _center_crop(nchw: np.ndarray, conversions: Conversions) -> np.ndarray:
    height, width = nchw.shape[2:]
    side = min(height, width)
    if height != width:
        conversions.note(f"center-cropped from {width}x{height} to {side}x{side} (width x height)", len(nchw))
    top, left = (height - side) // 2, (width - side) // 2
    return nchw[:, :, top:top + side, left:left + side]


def _unit(array: np.ndarray, where: str, conversions: Conversions) -> torch.Tensor:
    """Pixels as float32 in [0, 1]: uint8 / 255, uint16 / 65535, bool as 0/1, floats checked."""
    scale = {"u1": 255.0, "u2": 65535.0, "b1": 1.0}.get(f"{array.dtype.kind}{array.dtype.itemsize}")
    if scale is None and array.dtype.kind != "f":
        raise DatasetError(
            f"{where}: pixel type {array.dtype} unsupported; use uint8 0..255 or float in [0, 1]"
        )
    if array.dtype not in (np.uint8, np.float32):  # the two pixel types taken as they are
        conversions.note(f"converted from {array.dtype} pixels", len(array))
    values = np.array(array, dtype=np.float32)  # a writable copy, also of read-only memory maps
    if scale is not None:
        return torch.from_numpy(values / scale)
    if not np.isfinite(values).all():
        raise DatasetError(f"{where}: pixels contain NaN or infinite values")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise DatasetError(f"{where}: float pixels must lie in [0, 1], got {values.min()}..{values.max()}")
    return torch.from_numpy(values)


def _fit(unit: torch.Tensor, resolution: int, channels: int, conversions: Conversions) -> torch.Tensor:
    if unit.shape[1] == 3 and channels == 1:
        conversions.note("converted from RGB to grey (ITU-R BT.601 luma)", len(unit))
        unit = torch.einsum("nchw,c->nhw", unit, _LUMA)[:, None]
    elif unit.shape[1] == 1 and channels == 3:
        conversions.note("converted from grey to RGB (the channel repeated)", len(unit))
        unit = unit.expand(-1, 3, -1, -1)
    if unit.shape[-1] != resolution:
        side = unit.shape[-1]
        conversions.note(f"resized from {side}x{side} to {resolution}x{resolution} px (bilinear)", len(unit))
        unit = F.interpolate(unit, size=(resolution, resolution), mode="bilinear", align_corners=False,
                             antialias=unit.shape[-1] > resolution)
    return (unit * 2 - 1).clamp(-1, 1)

