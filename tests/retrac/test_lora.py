"""LoRA adapters and parameter subsets: exact scores against a brute force written with plain diffusers,
peft and torch autograd over only those parameters (an adapter in peft's format on a UNet2DModel, one in
diffusers' format on a text-conditional UNet2DConditionModel, a subset of a full UNet2DModel), the
stores' fingerprints of base and adapter, and every refusal at resolve."""

from __future__ import annotations

import json
import math
import shutil
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, QuerySpec, SlotSpec
from cli import main
from retrac.attribution import Attributor
from retrac.exceptions import CheckpointError, SpecError
from retrac.plan import IndexPlan
from storage import GradientStore, StaleStoreError
from tests.retrac.lora_models import (
    CHANNELS,
    SIDE,
    TEXT_LORA,
    UNET_LORA,
    adapted,
    lora_parameters,
    plain_attention,
    save_base,
    save_diffusers_adapter,
    save_peft_adapter,
)
from tests.retrac.reference import query_draws, seeded_noise, slot_scores
from tests.retrac.test_scores_exact import engine_scores
from tests.retrac.test_text_conditional import encoded
from tests.retrac.text_pipeline import CAPTIONS, save_text_pipeline, write_captioned_folder

K, M, SEED, WEIGHT = 3, 2, 5, 0.5
SCORE_TOLERANCE = 1e-4
"""Relative, as the other brute-force tests: float32 gradients of a few thousand parameters summed in
other orders (layer rules vs autograd) differ by ~1e-6 relative; the dot products and means add less."""
DIGITS = DatasetSpec(source="builtin:digits", resolution=SIDE, channels=CHANNELS, limit=6)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("lora") / "base")


def spec_of(checkpoint: Path, dataset: DatasetSpec = DIGITS, **changes: object) -> IndexSpec:
    fields = dict(
        dataset=dataset, checkpoints=(CheckpointSpec(path=str(checkpoint), weight=WEIGHT),), loss="mse",
        slots=SlotSpec(replay=False, grid=2, random=1, seed=3), projector=ProjectorSpec(kind="identity"),
        dtype="float32", shard_size=4,
    )
    return IndexSpec(**{**fields, **changes})


def gradient(model: nn.Module, params: list[torch.Tensor], scheduler: DDPMScheduler, image: torch.Tensor,
             timestep: int, noises: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
    """The flat gradient over `params` of the mean MSE loss of one image at one timestep over noises
    `(G, C, H, W)` (each `condition` tensor `(1, ...)`, repeated per noise), by one autograd call."""
    count = noises.shape[0]
    steps = torch.full((count,), timestep)
    noisy = scheduler.add_noise(image.expand(count, *image.shape), noises, steps)
    repeated = {k: v.expand(count, *v.shape[1:]) for k, v in condition.items()}
    prediction = model(noisy, steps, **repeated).sample
    value = ((prediction - noises) ** 2).flatten(1).mean(1).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def brute_force(model: nn.Module, params: list[torch.Tensor], plan: IndexPlan, rows, queries: torch.Tensor,
                train_conditions: list[dict[str, torch.Tensor]] | None = None,
                query_condition: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """(N, Q) TracIn and ReTrac scores of one checkpoint (method.md sections 1-4) over `params`."""
    scheduler = DDPMScheduler.from_pretrained(plan.scheduler_folder)
    images, shape = plan.dataset.images, tuple(plan.dataset.images.shape[1:])
    conditions = train_conditions or [{} for _ in range(len(images))]
    train_side = [
        torch.stack([
            gradient(model, params, scheduler, images[n], t, seeded_noise(s, shape)[None], **conditions[n])
            for t, s in zip(rows.timesteps[n].tolist(), rows.seeds[n].tolist(), strict=True)
        ])
        for n in range(len(images))
    ]
    grid = [math.floor(v) for v in torch.linspace(1, 999, K, dtype=torch.float64).tolist()]
    query_side = []
    for query in queries:
        noise = query_draws(SEED, K, M, shape)
        query_side.append(torch.stack([
            gradient(model, params, scheduler, query, t, noise[k], **(query_condition or {}))
            for k, t in enumerate(grid)
        ]))
    return slot_scores(train_side, query_side, WEIGHT)


def assert_scores_equal(
    plan: IndexPlan, model: nn.Module, params: list[torch.Tensor], prompt: str | None = None,
    train_conditions: list[dict[str, torch.Tensor]] | None = None,
    query_condition: dict[str, torch.Tensor] | None = None,
) -> None:
    """The plan's exact scores equal the brute force's over `params` (printing the largest relative
    difference), by the layer rules, over as many parameters as the plan says."""
    attributor = Attributor(plan)
    assert attributor.computer(0).strategy == "layerwise"  # LoRA's Linear and Conv2d factors have rules
    assert attributor.computer(0).num_params == sum(p.numel() for p in params) == plan.parameter_count
    rows = attributor.index()[0]
    images = plan.dataset.images
    queries = torch.stack([images[1], -images[4]])
    spec = QuerySpec(timesteps=K, draws=M, seed=SEED, prompt=prompt)
    results = attributor.attribute(queries, spec, top_k=len(images))
    expected = brute_force(model, params, plan, rows, queries, train_conditions, query_condition)
    for method in ("tracin", "retrac"):
        got = engine_scores(results, plan.dataset.ids, method)
        scale = float(expected[method].abs().max())
        print(f"{method}: max error {float((got - expected[method]).abs().max()) / scale:.2e} of the largest")
        torch.testing.assert_close(got, expected[method], rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE * scale)


def test_peft_adapter_scores_equal_brute_force(base: Path, tmp_path: Path) -> None:
    tensors = save_peft_adapter(tmp_path / "adapter", base)
    plan = IndexPlan.resolve(spec_of(tmp_path / "adapter", base=str(base)))
    assert plan.adapters is not None
    assert plan.adapters[0]["lora_alpha"] == 6
    model = adapted(UNet2DModel.from_pretrained(base / "unet"), tensors, **UNET_LORA)
    assert_scores_equal(plan, model, lora_parameters(model))


def test_diffusers_adapter_on_a_text_unet_scores_equal_brute_force(tmp_path: Path) -> None:
    pipeline = save_text_pipeline(tmp_path / "pipeline")
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    tensors = save_diffusers_adapter(tmp_path / "lora", unet)
    folder = write_captioned_folder(tmp_path / "data")
    data = DatasetSpec(source=str(folder), resolution=SIDE, channels=CHANNELS)
    plan = IndexPlan.resolve(spec_of(tmp_path / "lora", data, base=str(pipeline)))
    assert plan.adapters is not None
    assert plan.adapters[0]["alpha_from"] == "config"
    assert plan.text is not None  # the base pipeline's text encoder
    model = adapted(UNet2DConditionModel.from_pretrained(pipeline / "unet"), tensors, **TEXT_LORA)
    train = [{"encoder_hidden_states": encoded(pipeline, caption)} for caption in CAPTIONS]
    query = {"encoder_hidden_states": encoded(pipeline, "red dot")}
    assert_scores_equal(plan, model, lora_parameters(model), "red dot", train, query)


SUBSET = ("*attentions*.to_k.*", "*conv_out*")


def test_a_parameter_subset_scores_equal_brute_force(base: Path) -> None:
    plan = IndexPlan.resolve(spec_of(base, parameters=SUBSET))
    unet = plain_attention(UNet2DModel.from_pretrained(base / "unet"))
    params = [p for name, p in unet.named_parameters() if any(fnmatchcase(name, s) for s in SUBSET)]
    assert 0 < len(params) < len(list(unet.parameters()))
    assert_scores_equal(plan, unet, params)


def test_without_metadata_a_diffusers_adapter_records_alpha_taken_from_its_rank(tmp_path: Path) -> None:
    pipeline = save_text_pipeline(tmp_path / "pipeline")
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    save_diffusers_adapter(tmp_path / "lora", unet, metadata=False)
    folder = write_captioned_folder(tmp_path / "data")
    data = DatasetSpec(source=str(folder), resolution=SIDE, channels=CHANNELS)
    plan = IndexPlan.resolve(spec_of(tmp_path / "lora", data, base=str(pipeline)))
    assert plan.adapters is not None
    assert (plan.adapters[0]["lora_alpha"], plan.adapters[0]["alpha_from"][:4]) == (TEXT_LORA["r"], "rank")
    (folder / "extra").mkdir()
    tensors = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 16)
    save_file(tensors, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    with pytest.raises(CheckpointError, match="holds LoRA layers of the text encoder"):
        IndexPlan.resolve(spec_of(tmp_path / "lora", data, base=str(pipeline)))


def test_adapters_that_would_be_applied_wrongly_are_refused(base: Path, tmp_path: Path) -> None:
    save_peft_adapter(tmp_path / "adapter", base)
    with pytest.raises(CheckpointError, match="a LoRA adapter, not a diffusers model folder .*--base BASE"):
        IndexPlan.resolve(spec_of(tmp_path / "adapter"))
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder.* without --base"):
        IndexPlan.resolve(spec_of(base, base=str(base)))
    save_peft_adapter(tmp_path / "dora", base, use_dora=True)
    with pytest.raises(CheckpointError, match="a DoRA adapter"):
        IndexPlan.resolve(spec_of(tmp_path / "dora", base=str(base)))
    save_peft_adapter(tmp_path / "biased", base, bias="lora_only")
    with pytest.raises(CheckpointError, match="also trains biases"):
        IndexPlan.resolve(spec_of(tmp_path / "biased", base=str(base)))
    shutil.copytree(tmp_path / "adapter", tmp_path / "renamed")
    file = tmp_path / "renamed" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if ".conv1.lora_A" in k)
    tensors[key.replace(".conv1.", ".conv9.")] = tensors.pop(key)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match="1 tensors match no layer of the base"):
        IndexPlan.resolve(spec_of(tmp_path / "renamed", base=str(base)))
    (tmp_path / "diffusers").mkdir()
    save_file(tensors, tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    with pytest.raises(CheckpointError, match="no LoRA loader for a UNet2DModel; save its adapter in peft's"):
        IndexPlan.resolve(spec_of(tmp_path / "diffusers", base=str(base)))
    save_peft_adapter(tmp_path / "rank4", base, r=4)
    two = tuple(CheckpointSpec(path=str(tmp_path / name), weight=1) for name in ("adapter", "rank4"))
    with pytest.raises(CheckpointError, match="an adapter of another layout"):
        IndexPlan.resolve(spec_of(tmp_path / "adapter", base=str(base), checkpoints=two))


def test_a_pattern_that_matches_nothing_is_refused_naming_the_closest(base: Path) -> None:
    refused = r"'\*attentions\*\.to_kk\.\*' matches no trainable parameter.*closest names: .*to_k"
    with pytest.raises(SpecError, match=refused):
        IndexPlan.resolve(spec_of(base, parameters=("*conv_out*", "*attentions*.to_kk.*")))


def test_a_changed_adapter_or_base_makes_the_store_stale(base: Path, tmp_path: Path) -> None:
    shutil.copytree(base, tmp_path / "base")
    save_peft_adapter(tmp_path / "adapter", tmp_path / "base")
    spec = spec_of(tmp_path / "adapter", base=str(tmp_path / "base"), slots=SlotSpec(replay=False, grid=1))
    store = GradientStore.create(tmp_path / "index.zarr", spec)
    assert store.attrs["parameters"]["count"] == IndexPlan.resolve(spec).parameter_count > 0
    config = tmp_path / "adapter" / "adapter_config.json"
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "lora_alpha": 12}))
    changed = "checkpoint 0's adapter config .*lora_alpha changed \\(6 then, 12"
    with pytest.raises(StaleStoreError, match=changed):
        GradientStore.open(tmp_path / "index.zarr")
    config.write_text(original)
    save_peft_adapter(tmp_path / "adapter", tmp_path / "base", seed=9)
    with pytest.raises(StaleStoreError, match="checkpoint 0 .*adapter_model.safetensors\\): content changed"):
        GradientStore.open(tmp_path / "index.zarr")
    save_peft_adapter(tmp_path / "adapter", tmp_path / "base")  # restored: fresh again
    GradientStore.open(tmp_path / "index.zarr")
    save_base(tmp_path / "base", seed=4)
    with pytest.raises(StaleStoreError, match="the base model .*content changed"):
        GradientStore.open(tmp_path / "index.zarr")


def test_the_cli_indexes_an_adapter_and_refuses_in_one_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_peft_adapter(tmp_path / "adapter", base)
    common = ["--data", "builtin:digits", "--limit", "6", "--loss", "mse", "--no-replay", "--grid", "1",
              "--projector", "identity"]
    adapter = f"{tmp_path / 'adapter'}:weight=1"
    store = str(tmp_path / "index.zarr")
    assert main(["index", "create", store, "--base", str(base), "--checkpoint", adapter, *common]) == 0
    count = IndexPlan.resolve(spec_of(tmp_path / "adapter", base=str(base))).parameter_count
    told = f"LoRA adapters (peft's format, rank 2, alpha 6 from config) on {base}: gradients over {count:,}"
    assert told in capsys.readouterr().out
    assert main(["index", "inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["count"] == count
    for flags, message in (
        (["--checkpoint", adapter], "a LoRA adapter, not a diffusers model folder"),
        (["--checkpoint", f"{base}:weight=1", "--parameters", "*to_kk*"], "closest names"),
    ):
        assert main(["index", "create", str(tmp_path / "refused.zarr"), *flags, *common]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1
        assert message in error
        assert not (tmp_path / "refused.zarr").exists()
