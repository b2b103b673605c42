"""A strict load of the real checkpoint would succeed: our 7B-MoT model, built
on the meta device, expects exactly the published names and shapes."""

from __future__ import annotations

import pytest

from openbagel.checkpoint import DERIVED_TENSORS, build_model, check_tensors, model_shapes
from openbagel.config import preset
from openbagel.errors import CheckpointError
from openbagel.model.vae import flux_ae_shapes

from .conftest import GOLDEN

LAYOUT = GOLDEN / "published-layout"


def read_layout(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (LAYOUT / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        out[key] = tuple(int(v) for v in shape.strip("[]").split(","))
    return out


def test_7b_mot_matches_published_layout():
    published = read_layout("ema-keys-7b-mot.txt")
    assert len(published) == 1223
    model = build_model(preset("7b-mot"))
    ours = model_shapes(model, DERIVED_TENSORS)
    assert ours == published
    assert (
        sum(p.numel() for p in model.parameters()) + sum(model.get_buffer(k).numel() for k in DERIVED_TENSORS)
        == 14_607_260_128
    )
    # the loader's own strict check passes with and without the derived tables
    check_tensors(published, ours, LAYOUT / "ema.safetensors", optional=DERIVED_TENSORS)
    without = {k: v for k, v in published.items() if k not in DERIVED_TENSORS}
    check_tensors(without, ours, LAYOUT / "ema.safetensors", optional=DERIVED_TENSORS)


def test_flux_vae_matches_published_layout():
    published = read_layout("ae-keys-flux.txt")
    ours = flux_ae_shapes(preset("7b-mot").vae)
    assert ours == published
    assert sum(_numel(s) for s in ours.values()) == 83_819_683


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_strict_check_names_the_tensor():
    ours = model_shapes(build_model(preset("tiny-golden")), DERIVED_TENSORS)
    bad = dict(ours)
    bad["language_model.lm_head.weight"] = (1, 2)
    with pytest.raises(CheckpointError, match=r"lm_head.weight.*shape \[1, 2\]"):
        check_tensors(bad, ours, LAYOUT / "x.safetensors")
    missing = {k: v for k, v in ours.items() if k != "vae2llm.bias"}
    with pytest.raises(CheckpointError, match="missing tensor 'vae2llm.bias'"):
        check_tensors(missing, ours, LAYOUT / "x.safetensors")
    extra = dict(ours, **{"foo.bar": (3,)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'foo.bar'"):
        check_tensors(extra, ours, LAYOUT / "x.safetensors")
