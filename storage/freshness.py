"""Whether a store still matches its inputs: fingerprints recorded at create, compared at every open.

A store is stale only when an input really changed: the same bytes at another path (a moved folder, a
link), inode or mtime, or a config saved again by another diffusers version, are the same input. Each
change is named with its input, its file and what changed (what to restore, or rebuild the index).

Recorded in the store's `fingerprints` attribute:

    dataset           sha256 of the pixels, ids and groups (`ImageDataset.fingerprint`)
    weights           per checkpoint, sha256 of its safetensors file (a LoRA adapter's, with a base)
    base, adapters    LoRA adapters' base model: sha256 of its weights, and each adapter's config entries
                      (`retrac.adapters.settings`); None for full checkpoints
    architecture      the UNet config entries that fix the parameters (every checkpoint shares them)
    record            sha256 of the replay record file (None without replay)
    replayed          per checkpoint, sha256 of the replayed (timestep, seed) of each sample at its epoch
    scheduler_config  the scheduler config's entries (`retrac.models.scheduler_settings`)
    vae               a latent model's VAE: sha256 of its weights and its config's entries (else None)
    labels            sha256 of the label mapping and each sample's label (class-conditional; else None)
    text              a text-conditional model's: sha256 of its text encoder (config entries and weights),
                      of its tokenizer's files, and of each sample's caption (`retrac.text`; None otherwise)

Stores written before these (format 2 all the same) hold `checkpoints` (config and weights hashed
together) and `scheduler` (the config file's sha256) instead; they are compared by those.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrac.adapters import checkpoint_weights
from retrac.datasets import old_sample_ids
from retrac.latents import LatentSpace
from retrac.models import (
    SCHEDULER_CONFIG,
    fingerprint_checkpoint,
    scheduler_settings,
    sha256_file,
    weights_file,
)
from retrac.plan import IndexPlan
from retrac.replay import RECORD_NAME, TrainingRun
from retrac.text import captions_fingerprint

REBUILD = "rebuild the index: delete it and create it again (`retrac index create`, then `retrac index run`)"
"""What to do about a stale store, when its inputs cannot be restored; ends every stale message."""


def fingerprints(plan: IndexPlan) -> dict[str, Any]:
    """What a new store records about its inputs (module docstring)."""
    record = _record_file(plan)
    return {
        "dataset": plan.dataset.fingerprint,
        "weights": [sha256_file(checkpoint_weights(c.path)) for c in plan.checkpoints],
        "base": sha256_file(weights_file(plan.base)) if plan.base is not None else None,
        "adapters": list(plan.adapters) if plan.adapters is not None else None,
        "architecture": plan.architecture,
        "record": sha256_file(record) if record is not None else None,
        "replayed": _replayed(plan, plan.run) if plan.run is not None and record is not None else None,
        "scheduler_config": scheduler_settings(plan.scheduler_folder),
        "vae": _vae(plan.latent_space),
        "labels": _labels(plan),
        "text": _text(plan),
    }


def changes(then: dict[str, Any], plan: IndexPlan, stored_ids: Sequence[str]) -> list[str]:
    """One phrase per input of `plan` that differs from the fingerprints `then` recorded, naming the
    input, its file and what changed; empty when the store is fresh."""
    return [
        *_dataset_changes(then["dataset"], plan, tuple(stored_ids)),
        *_checkpoint_changes(then, plan),
        *_record_changes(then, plan),
        *_scheduler_changes(then, plan),
        *_vae_changes(then.get("vae"), plan.latent_space),
        *_label_changes(then, plan),
        *_text_changes(then.get("text"), plan),
    ]


def _dataset_changes(then: str, plan: IndexPlan, stored_ids: tuple[str, ...]) -> list[str]:
    dataset = plan.dataset
    if dataset.fingerprint == then:
        return []
    where = f"the dataset ({plan.spec.dataset.source})"
    if dataset.ids == stored_ids:
        return [
            f"{where}: the pixels or groups of its samples changed since the store was built "
            f"(sha256 {_short(then)} then, {_short(dataset.fingerprint)} now)"
        ]
    if old_sample_ids(dataset.ids) == stored_ids:
        return [
            f"{where}: the store names its samples by the rule of earlier versions ({stored_ids[0]!r}); "
            f"sample ids are now the files' relative paths ({dataset.ids[0]!r}) and the store's noise "
            "seeds derive from them"
        ]
    before, now = set(stored_ids), set(dataset.ids)
    gone, new = [i for i in stored_ids if i not in now], [i for i in dataset.ids if i not in before]
    if not gone and not new:
        return [f"{where}: its samples come in another order than when the store was built"]
    parts = [f"{len(gone)} sample(s) gone ({_few(gone)})"] if gone else []
    parts += [f"{len(new)} new ({_few(new)})"] if new else []
    return [f"{where}: {', '.join(parts)} since the store was built"]


def _checkpoint_changes(then: dict[str, Any], plan: IndexPlan) -> list[str]:
    recorded = then.get("weights", then.get("checkpoints", []))
    if len(recorded) != len(plan.checkpoints):
        source = f"the run ({plan.run.folder})" if plan.run is not None else "the spec"
        return [
            f"{source} gives {len(plan.checkpoints)} checkpoints now, {len(recorded)} when the store was "
            "built"
        ]
    if "weights" not in then:
        return [
            f"checkpoint {c} ({checkpoint.path}): its config or weights changed since the store was built"
            for c, (checkpoint, old) in enumerate(zip(plan.checkpoints, recorded, strict=True))
            if fingerprint_checkpoint(checkpoint.path) != old
        ]
    found = []
    for c, (checkpoint, old) in enumerate(zip(plan.checkpoints, recorded, strict=True)):
        found += _weights_change(f"checkpoint {c}", checkpoint_weights(checkpoint.path), old)
    found += _adapter_changes(then, plan)
    differing = _differing(then["architecture"], plan.architecture)
    if differing:
        found.append(f"the checkpoints' config.json ({plan.checkpoints[0].path}): {differing}")
    return found


def _adapter_changes(then: dict[str, Any], plan: IndexPlan) -> list[str]:
    """The base model's weights and each adapter's config, against those recorded (stores from before
    adapters recorded neither, and had none)."""
    if plan.base is None:
        return [] if then.get("base") is None else ["the index's base model: the store was built with one"]
    if then.get("base") is None:
        return [f"the base model ({plan.base}): the store was built without one, on full checkpoints"]
    found = _weights_change("the base model", weights_file(plan.base), then["base"])
    for c, (old, new) in enumerate(zip(then["adapters"], plan.adapters or (), strict=False)):
        differing = _differing(old, new)
        if differing:
            found.append(f"checkpoint {c}'s adapter config ({plan.checkpoints[c].path}): {differing}")
    return found


def _weights_change(what: str, file: Path, then: str) -> list[str]:
    """`what`'s weights `file`, if its sha256 is no longer `then`."""
    now = sha256_file(file)
    if now == then:
        return []
    return [
        f"{what} ({file}): content changed since the store was built "
        f"(sha256 {_short(then)} then, {_short(now)} now)"
    ]


def _record_changes(then: dict[str, Any], plan: IndexPlan) -> list[str]:
    file = _record_file(plan)
    if file is None or sha256_file(file) == then["record"]:
        return []
    if then.get("replayed") is None or plan.run is None:
        return [f"the replay record ({file}): content changed since the store was built"]
    epochs = [  # a changed number of checkpoints is told by _checkpoint_changes
        str(checkpoint.epoch)
        for checkpoint, old, new in zip(
            plan.checkpoints, then["replayed"], _replayed(plan, plan.run), strict=False
        )
        if old != new
    ]
    if not epochs:
        return []  # the file changed (more epochs, other losses), not the steps this store replays
    return [
        f"the replay record ({file}): the recorded steps of epoch {', '.join(epochs)} changed since the "
        "store was built"
    ]


def _scheduler_changes(then: dict[str, Any], plan: IndexPlan) -> list[str]:
    file = plan.scheduler_folder / SCHEDULER_CONFIG
    if "scheduler_config" not in then:
        if sha256_file(file) == then.get("scheduler"):
            return []
        return [f"the scheduler ({file}): content changed since the store was built"]
    differing = _differing(then["scheduler_config"], scheduler_settings(plan.scheduler_folder))
    return [f"the scheduler ({file}): {differing}"] if differing else []


def _vae(latent_space: LatentSpace | None) -> dict[str, Any] | None:
    if latent_space is None:
        return None
    return {"weights": sha256_file(latent_space.weights_file), "config": latent_space.settings}


def _vae_changes(then: dict[str, Any] | None, latent_space: LatentSpace | None) -> list[str]:
    """The VAE's change: its weights or config, or one found now where the store was built without
    (a pixel-space index whose pipeline gained a `vae/`), or none found where it had one."""
    if latent_space is None:
        if then is None:
            return []
        return [
            "the VAE: the store's latents were encoded by one, and none is found beside the checkpoint now"
        ]
    if then is None:
        return [
            f"the VAE ({latent_space.folder}): found now, none when the store was built on the images "
            "themselves"
        ]
    found = _weights_change("the VAE", latent_space.weights_file, then["weights"])
    differing = _differing(then["config"], latent_space.settings)
    if differing:
        found.append(f"the VAE's config.json ({latent_space.folder}): {differing}")
    return found


def _label_changes(then: dict[str, Any], plan: IndexPlan) -> list[str]:
    now = _labels(plan)
    if then.get("labels") == now:
        return []
    return [
        f"the dataset's class labels ({plan.spec.dataset.source}): the label mapping or a sample's label "
        "changed since the store was built"
    ]


def _labels(plan: IndexPlan) -> str | None:
    if plan.classes is None or plan.dataset.labels is None:
        return None
    return plan.classes.fingerprint(plan.dataset.labels)


_TEXT_PARTS = {
    "text_encoder": "the text encoder ({folder}): its weights or config changed since the store was built",
    "tokenizer": "the tokenizer ({folder}): its files changed since the store was built",
    "captions": "the dataset's captions ({folder}): a sample's caption changed since the store was built",
}


def _text_changes(then: dict[str, str] | None, plan: IndexPlan) -> list[str]:
    """The text side's changes: the encoder, the tokenizer, the captions, each named with its folder."""
    now = _text(plan)
    if then == now:
        return []
    if then is None or now is None:
        return ["the UNet's text conditioning: the store was built for another kind of UNet"]
    assert plan.text is not None  # `now` is not None
    folders = {"text_encoder": plan.text.encoder_folder, "tokenizer": plan.text.tokenizer_folder,
               "captions": plan.spec.dataset.source}
    return [
        _TEXT_PARTS[part].format(folder=folders[part]) for part in _TEXT_PARTS if then.get(part) != now[part]
    ]


def _text(plan: IndexPlan) -> dict[str, str] | None:
    if plan.text is None or plan.dataset.captions is None:
        return None
    return {**plan.text.fingerprint(), "captions": captions_fingerprint(plan.dataset.captions)}


def _record_file(plan: IndexPlan) -> Path | None:
    return plan.run.folder / RECORD_NAME if plan.run is not None and plan.spec.slots.replay else None


def _replayed(plan: IndexPlan, run: TrainingRun) -> list[str]:
    """Per checkpoint, sha256 of the (timestep, seed) the record gives each sample at its epoch."""
    digests = []
    for checkpoint in plan.checkpoints:
        timesteps, seeds = run.replayed(plan.dataset.ids, int(checkpoint.epoch or 0))
        digest = hashlib.sha256(np.ascontiguousarray(timesteps.numpy(), dtype=np.int64).data)
        digest.update(np.ascontiguousarray(seeds.numpy(), dtype=np.int64).data)
        digests.append(digest.hexdigest())
    return digests


def _differing(then: dict[str, Any], now: dict[str, Any]) -> str:
    """The entries that differ between two configs, each with both values; empty if none."""
    keys = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
    shown = [f"{k} changed ({_value(then.get(k))} then, {_value(now.get(k))} now)" for k in keys[:3]]
    return ", ".join(shown) + (f" and {len(keys) - 3} more entries" if len(keys) > 3 else "")


def _value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(digest: str) -> str:
    return f"{digest[:12]}..."


def _few(ids: Sequence[str]) -> str:
    return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
