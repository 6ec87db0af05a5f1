"""Text-conditional pipelines: exact scores against a brute force written from method.md with plain
diffusers and transformers (each sample under its caption's text encoder states), caption loading,
staleness of a changed caption, and the refusals of a query or dataset that does not fit the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from transformers import CLIPTextModel, CLIPTokenizer

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, QuerySpec, SlotSpec
from retrac.attribution import Attributor
from retrac.conditions import query_conditions
from retrac.datasets import load_dataset
from retrac.exceptions import CheckpointError, DatasetError, SpecError
from retrac.plan import IndexPlan
from storage import GradientStore, StaleStoreError
from tests.retrac.reference import query_draws, seeded_noise
from tests.retrac.test_scores_exact import engine_scores
from tests.retrac.text_pipeline import CAPTIONS, CHANNELS, SIDE, save_text_pipeline, write_captioned_folder

K, M, SEED = 3, 2, 5
SCORE_TOLERANCE = 1e-4
"""Relative, as the other brute-force tests: float32 gradients of ~50k parameters summed in other orders
(layer rules vs autograd) differ by ~1e-6 relative; the dot products and means add less."""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return save_text_pipeline(tmp_path_factory.mktemp("text") / "pipeline")


def spec_of(pipeline: Path, data: Path, **changes: object) -> IndexSpec:
    fields = dict(
        dataset=DatasetSpec(source=str(data), resolution=SIDE, channels=CHANNELS),
        checkpoints=(CheckpointSpec(path=str(pipeline), weight=0.5),), loss="mse",
        slots=SlotSpec(replay=False, grid=2, random=1, seed=3), projector=ProjectorSpec(kind="identity"),
        dtype="float32", shard_size=4,
    )
    return IndexSpec(**{**fields, **changes})


def encoded(pipeline: Path, text: str) -> torch.Tensor:
    """A caption's `encoder_hidden_states` `(1, L, D)` as diffusers' text-to-image training script makes
    them."""
    tokenizer = CLIPTokenizer.from_pretrained(pipeline / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder").eval()
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def gradient(unet: UNet2DConditionModel, scheduler: DDPMScheduler, image: torch.Tensor, timestep: int,
             noises: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The flat gradient of the mean MSE loss of one image under text states `(1, L, D)` at one timestep
    over noises `(G, C, H, W)`, by one autograd call."""
    count = noises.shape[0]
    steps = torch.full((count,), timestep)
    noisy = scheduler.add_noise(image.expand(count, *image.shape), noises, steps)
    prediction = unet(noisy, steps, encoder_hidden_states=states.expand(count, -1, -1)).sample
    value = ((prediction - noises) ** 2).flatten(1).mean(1).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(unet.parameters()))])


def brute_force_scores(pipeline: Path, slots: list[list[tuple[int, int]]], images: torch.Tensor,
                       queries: torch.Tensor, prompt: str) -> dict[str, torch.Tensor]:
    """(N, Q) TracIn and ReTrac scores of one checkpoint of weight 0.5 (method.md sections 1-4)."""
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    unet.set_attn_processor(AttnProcessor())  # the plain processor, as training and retrac use
    scheduler = DDPMScheduler.from_pretrained(pipeline / "scheduler")
    shape = tuple(images.shape[1:])
    train_side = [
        torch.stack(
            [
                gradient(
                    unet,
                    scheduler,
                    images[n],
                    t,
                    seeded_noise(s, shape)[None],
                    encoded(pipeline, CAPTIONS[n]),
                )
                for t, s in slots[n]
            ]
        )
        for n in range(len(images))
    ]
    grid = [math.floor(v) for v in torch.linspace(1, 999, K, dtype=torch.float64).tolist()]
    states = encoded(pipeline, prompt)
    scores = {m: torch.zeros(len(images), len(queries)) for m in ("tracin", "retrac")}
    for q, query in enumerate(queries):
        noise = query_draws(SEED, K, M, shape)
        hs = torch.stack([gradient(unet, scheduler, query, t, noise[k], states) for k, t in enumerate(grid)])
        tracin, retrac = hs.mean(0), (hs / hs.norm(dim=1, keepdim=True)).mean(0)
        for n, g in enumerate(train_side):
            scores["tracin"][n, q] = 0.5 * (g @ tracin).mean()
            scores["retrac"][n, q] = 0.5 * ((g / g.norm(dim=1, keepdim=True)) @ retrac).mean()
    return scores


def test_exact_scores_equal_brute_force(pipeline: Path, tmp_path: Path) -> None:
    plan = IndexPlan.resolve(spec_of(pipeline, write_captioned_folder(tmp_path / "data")))
    assert plan.dataset.captions == CAPTIONS
    assert plan.text is not None
    attributor = Attributor(plan)
    assert attributor.computer(0).strategy == "layerwise"  # every module of the UNet has a layer rule
    rows = attributor.index()[0]
    slots = [
        list(zip(rows.timesteps[n].tolist(), rows.seeds[n].tolist(), strict=True))
        for n in range(len(CAPTIONS))
    ]
    images = plan.dataset.images
    queries = torch.stack([images[1], -images[4]])
    results = attributor.attribute(queries, QuerySpec(timesteps=K, draws=M, seed=SEED, prompt="red dot"),
                                   top_k=len(CAPTIONS))
    expected = brute_force_scores(pipeline, slots, images, queries, "red dot")
    for method in ("tracin", "retrac"):
        got = engine_scores(results, plan.dataset.ids, method)
        scale = float(expected[method].abs().max())
        torch.testing.assert_close(got, expected[method], rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE * scale)
    # the prompt is used: under another prompt the scores move by far more than the tolerance
    other = attributor.attribute(
        queries, QuerySpec(timesteps=K, draws=M, seed=SEED, prompt=""), top_k=len(CAPTIONS)
    )
    moved = engine_scores(other, plan.dataset.ids, "tracin") - engine_scores(
        results, plan.dataset.ids, "tracin"
    )
    assert float(moved.abs().max()) > 100 * SCORE_TOLERANCE * float(expected["tracin"].abs().max())


def test_a_query_needs_its_prompt_and_other_models_refuse_one(pipeline: Path, tmp_path: Path) -> None:
    attributor = Attributor(IndexPlan.resolve(spec_of(pipeline, write_captioned_folder(tmp_path / "data"))))
    query = torch.zeros(1, CHANNELS, SIDE, SIDE)
    with pytest.raises(SpecError, match="text-conditional: give the query's prompt"):
        attributor.attribute(query, QuerySpec(timesteps=1, draws=1))
    with pytest.raises(SpecError, match="text-conditional: it takes no label"):
        attributor.attribute(query, QuerySpec(timesteps=1, draws=1, prompt="dot", label="3"))
    with pytest.raises(SpecError, match="not text-conditional: it takes no prompt"):
        query_conditions(None, None, 1, prompt="a red dot")


def test_captions_come_from_metadata_jsonl_or_npz(tmp_path: Path) -> None:
    folder = write_captioned_folder(tmp_path / "data", column="caption")
    with pytest.raises(DatasetError, match="no caption string in column 'text'"):
        load_dataset(DatasetSpec(source=str(folder), resolution=SIDE))
    loaded = load_dataset(DatasetSpec(source=str(folder), resolution=SIDE, caption_column="caption", limit=3))
    assert loaded.captions == CAPTIONS[:3]
    (folder / "extra.png").write_bytes((folder / "img-00.png").read_bytes())
    with pytest.raises(DatasetError, match="gives no caption to 1 images, e.g. \\['extra.png'\\]"):
        load_dataset(DatasetSpec(source=str(folder), resolution=SIDE, caption_column="caption"))
    np.savez(
        tmp_path / "data.npz", images=np.zeros((2, SIDE, SIDE), np.float32), captions=np.array(["x", "y z"])
    )
    assert load_dataset(DatasetSpec(source=str(tmp_path / "data.npz"), resolution=SIDE)).captions == (
        "x",
        "y z",
    )


def test_a_dataset_or_pipeline_that_does_not_fit_is_refused(pipeline: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "plain.npz", images=np.zeros((2, SIDE, SIDE), np.float32))
    with pytest.raises(SpecError, match="text-conditional but the dataset 'plain.npz' has no captions"):
        IndexPlan.resolve(spec_of(pipeline, tmp_path / "plain.npz"))
    data = write_captioned_folder(tmp_path / "data")
    bare = tmp_path / "bare"
    bare.mkdir()
    for part in ("unet", "scheduler"):
        (bare / part).symlink_to(pipeline / part)
    with pytest.raises(CheckpointError, match="has no text_encoder/config.json"):
        IndexPlan.resolve(spec_of(bare, data))


def test_a_changed_caption_makes_the_store_stale(pipeline: Path, tmp_path: Path) -> None:
    data = write_captioned_folder(tmp_path / "data")
    GradientStore.create(tmp_path / "index.zarr", spec_of(pipeline, data))
    assert GradientStore.open(tmp_path / "index.zarr").text_conditional  # fresh
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"file_name": "img-02.png", "text": "blue bar"})
    (data / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(StaleStoreError, match="the dataset's captions .* a sample's caption changed"):
        GradientStore.open(tmp_path / "index.zarr")
