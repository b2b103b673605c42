"""Loading a checkpoint folder: strictness and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from openbagel import BagelPipeline, CheckpointError, config_from_checkpoint, preset
from openbagel.checkpoint import load_model, load_vae, resolve_checkpoint_dir


@pytest.fixture()
def ckpt(tmp_path, tiny_dir):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.mark.parametrize("name", ["ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"])
def test_missing_file_is_named(ckpt, name):
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing {name}"):
        BagelPipeline.from_pretrained(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        BagelPipeline.from_pretrained(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "ema.safetensors").read_bytes()
    (ckpt / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ema.safetensors: not a readable safetensors file"):
        load_model(ckpt)


def test_not_safetensors(ckpt):
    (ckpt / "ae.safetensors").write_text("this is not a safetensors file")
    with pytest.raises(CheckpointError, match="ae.safetensors: not a readable safetensors file"):
        load_vae(ckpt)


def test_malformed_json(ckpt):
    (ckpt / "llm_config.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="llm_config.json: not valid JSON"):
        config_from_checkpoint(ckpt)


@pytest.mark.parametrize(
    "file,content,message",
    [
        ("llm_config.json", "[1, 2]", "expected a JSON object"),
        ("llm_config.json", b"\xff\xfe\x00", "not valid JSON"),
        ("llm_config.json", '{"hidden_size": "abc"}', "llm_config.json: invalid setting"),
        ("vit_config.json", '{"hidden_size": 32}', "vit_config.json: missing the field 'num_hidden_layers'"),
        ("openbagel.json", '{"t2i": {"sampling": {"num_timesteps": "ten"}}}', "openbagel.json: invalid setting"),
        ("openbagel.json", '{"vae_transform": {}}', "openbagel.json: missing the field 'max_size'"),
        (
            "openbagel.json",
            '{"vae_transform": {"max_size": 256, "min_size": 64, "stride": 0}}',
            "stride must be positive, got 0",
        ),
        ("openbagel.json", '{"max_latent_size": 64.0}', "max_latent_size must be an integer"),
        (
            "openbagel.json",
            '{"vit_transform": {"max_size": 224, "min_size": 56, "stride": 7}}',
            "multiple of the ViT patch size 14",
        ),
        (
            "openbagel.json",
            '{"vae_transform": {"max_size": 256, "min_size": 64, "stride": 24}}',
            "must be a multiple of 16",
        ),
        ("openbagel.json", '{"t2i": {"width": 0, "height": 0}}', "t2i default size 0x0"),
        ("openbagel.json", '{"edit": {"width": 17}}', "edit default size 17x0"),
        (
            "openbagel.json",
            '{"text": {"max_new_tokens": -1}}',
            r"openbagel.json: invalid setting \(max_new_tokens must be positive",
        ),
        ("openbagel.json", '{"vae": {"shift_factor": NaN}}', "shift_factor must be a finite number"),
        ("openbagel.json", '{"position_mode": "weird"}', "position_mode must be"),
        ("openbagel.json", '{"vae": {"colour": 1}}', "openbagel.json: invalid setting"),
        ("openbagel.json", "[]", "expected a JSON object"),
    ],
)
def test_malformed_configs(ckpt, file, content, message):
    path = ckpt / file
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(CheckpointError, match=message):
        config_from_checkpoint(ckpt)


def test_config_with_zero_heads(ckpt):
    data = json.loads((ckpt / "llm_config.json").read_text())
    data["num_attention_heads"] = 0
    (ckpt / "llm_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="num_heads must be positive"):
        config_from_checkpoint(ckpt)
    data["num_attention_heads"] = 4
    data["num_hidden_layers"] = 1_000_000_000
    (ckpt / "llm_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="beyond any BAGEL model"):
        config_from_checkpoint(ckpt)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "nope")


def test_wrong_tensor_names_the_key_and_file(ckpt):
    sd = load_file(ckpt / "ema.safetensors")
    sd["connector.fc1.weight"] = sd["connector.fc1.weight"][:, :5].contiguous()
    save_file(sd, ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"ema.safetensors: tensor 'connector.fc1.weight' has shape \[64, 5\]"):
        load_model(ckpt)


def test_vae_unexpected_key(ckpt):
    sd = load_file(ckpt / "ae.safetensors")
    sd["encoder.extra.weight"] = torch.zeros(3)
    save_file(sd, ckpt / "ae.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'encoder.extra.weight'"):
        load_vae(ckpt)


def test_position_tables_optional_and_checked(ckpt):
    sd = load_file(ckpt / "ema.safetensors")
    ref = load_model(ckpt)
    # absent: rebuilt identically
    save_file({k: v for k, v in sd.items() if not k.endswith("pos_embed.pos_embed")}, ckpt / "ema.safetensors")
    m = load_model(ckpt)
    assert torch.equal(m.latent_pos_embed.pos_embed, ref.latent_pos_embed.pos_embed)
    assert torch.equal(m.latent_pos_embed.pos_embed, sd["latent_pos_embed.pos_embed"])
    # present but different: refused
    sd["vit_pos_embed.pos_embed"] = sd["vit_pos_embed.pos_embed"] + 0.5
    save_file(sd, ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match="vit_pos_embed.pos_embed"):
        load_model(ckpt)


def test_bfloat16_load(tiny_dir):
    m = load_model(tiny_dir, dtype=torch.bfloat16)
    assert m.language_model.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.is_meta for p in m.parameters())
    assert not any(b.is_meta for b in m.buffers())


def test_hf_cache_snapshot(tmp_path, tiny_dir):
    repo = tmp_path / "models--ByteDance-Seed--BAGEL-7B-MoT"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert resolve_checkpoint_dir(repo) == snap
    assert resolve_checkpoint_dir(snap) == snap
    # refs/main that is not a file: the only snapshot is used
    (repo / "refs" / "main").unlink()
    (repo / "refs" / "main").mkdir()
    assert resolve_checkpoint_dir(repo) == snap
    shutil.copytree(tiny_dir, repo / "snapshots" / "def456")
    with pytest.raises(CheckpointError, match="2 snapshots"):
        resolve_checkpoint_dir(repo)
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint_dir(snap / "ema.safetensors")


def test_corrupt_tokenizer(ckpt):
    (ckpt / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="cannot read the tokenizer files") as err:
        BagelPipeline.from_pretrained(ckpt)
    assert "\n" not in str(err.value)


def test_config_quirks(tmp_path, tiny_dir):
    cfg = config_from_checkpoint(tiny_dir)
    assert cfg == preset("tiny-golden")
    vit = json.loads((tiny_dir / "vit_config.json").read_text())
    assert cfg.vit.num_layers == vit["num_hidden_layers"] - 1  # last layer dropped
    # without any extra file the published 7B-MoT settings apply
    for f in ("llm_config.json", "vit_config.json"):
        shutil.copy(tiny_dir / f, tmp_path / f)
    plain = config_from_checkpoint(tmp_path)
    published = preset("7b-mot")
    assert plain.vae == published.vae
    assert (plain.max_latent_size, plain.latent_patch_size, plain.vit_max_num_patch_per_side) == (64, 2, 70)
    assert plain.vae_transform == published.vae_transform and plain.t2i == published.t2i
    # the golden extra file sets the VAE but keeps the published task defaults
    shutil.copy(tiny_dir / "tiny_extra.json", tmp_path / "tiny_extra.json")
    golden = config_from_checkpoint(tmp_path)
    assert golden.vae == preset("tiny-golden").vae and golden.t2i == published.t2i


def test_integer_weights_refused(ckpt):
    sd = load_file(ckpt / "ema.safetensors")
    sd["vae2llm.bias"] = sd["vae2llm.bias"].to(torch.int64)
    save_file(sd, ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match="'vae2llm.bias' has dtype torch.int64"):
        load_model(ckpt)


def test_tokenizer_of_the_wrong_kind(ckpt):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "BertTokenizer"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="cannot read the tokenizer files"):
        BagelPipeline.from_pretrained(ckpt)


def test_overlong_model_path(tmp_path):
    with pytest.raises(CheckpointError, match="bad checkpoint path"):
        resolve_checkpoint_dir(tmp_path / ("m" * 300))


def _set_raw_bytes(file, key: str, index: int, raw: bytes) -> None:
    """Overwrite the bytes of element ``index`` of tensor ``key`` in a safetensors file (as a bit flip on disk does)."""
    data = bytearray(file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + header_len])[key]
    start = 8 + header_len + entry["data_offsets"][0] + index * len(raw)
    data[start : start + len(raw)] = raw
    file.write_bytes(bytes(data))


def test_non_finite_weights_are_refused(ckpt):
    """A NaN or an infinity (a flipped exponent) in a weights file is refused at load, the tensor and file named."""
    sd = load_file(ckpt / "ema.safetensors")
    key = "language_model.model.layers.0.mlp.gate_proj.weight"
    sd[key] = sd[key].clone()
    sd[key].view(-1)[7] = float("nan")
    save_file(sd, ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match=rf"ema.safetensors: tensor '{key}' holds 1 NaN or infinite value"):
        BagelPipeline.from_pretrained(ckpt)
    ae = load_file(ckpt / "ae.safetensors")
    name = next(k for k, v in ae.items() if v.dtype == torch.float32 and v.numel() > 3)
    _set_raw_bytes(ckpt / "ae.safetensors", name, 3, b"\x00\x00\x80\x7f")  # float32 +inf
    with pytest.raises(CheckpointError, match=rf"ae.safetensors: tensor '{name}' holds 1 NaN"):
        load_vae(ckpt)
    # packed integers are not weights to check; finite values near the float32 limit pass
    from openbagel.weights import check_finite

    fine = {"packed": torch.tensor([-128, 127], dtype=torch.int8), "big": torch.tensor([3e38, 3e38])}
    check_finite(fine, ckpt / "x.safetensors")
    fp8 = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match="'scale' holds 1 NaN"):
        check_finite({**fine, "scale": fp8}, ckpt / "x.safetensors")


def test_non_finite_quantized_weights_are_refused(tmp_path):
    """The floating tensors of a quantized folder (scales, unquantized weights) are checked too."""
    from openbagel.pipeline import DEFAULT_MODEL
    from openbagel.quantize import QUANT_WEIGHTS, save_quantized

    pipe = BagelPipeline.from_pretrained(dtype="bfloat16", quant="llm=int8")
    out = save_quantized(pipe.model, pipe.quant, DEFAULT_MODEL, tmp_path / "q")
    BagelPipeline.from_pretrained(out)  # loads
    tensors = load_file(out / QUANT_WEIGHTS)
    key = next(k for k, v in tensors.items() if v.dtype == torch.bfloat16 and v.numel() > 1)
    _set_raw_bytes(out / QUANT_WEIGHTS, key, 1, b"\xc0\x7f")  # bfloat16 NaN
    with pytest.raises(CheckpointError, match=rf"{QUANT_WEIGHTS}: tensor '{key}' holds 1 NaN"):
        BagelPipeline.from_pretrained(out)


def _set_max_latent_size(ckpt, side: int) -> None:
    extra = json.loads((ckpt / "openbagel.json").read_text())
    extra["max_latent_size"] = side
    (ckpt / "openbagel.json").write_text(json.dumps(extra))


def test_raised_max_latent_size_rebuilds_the_table(ckpt):
    """openbagel.json raises max_latent_size above the stored table's 64 (images
    above 1024 px): the table is rebuilt at 96x96, the stored rows are checked
    against the rebuilt rows of the same positions."""
    from openbagel.model.layers import sincos_2d_table

    _set_max_latent_size(ckpt, 96)
    pipe = BagelPipeline.from_pretrained(ckpt)
    assert pipe.config.max_latent_size == 96 and pipe.config.max_image_side == 96 * 16
    table = pipe.model.latent_pos_embed.pos_embed
    assert table.shape == (96 * 96, 64) and torch.equal(table, sincos_2d_table(96, 64))
    stored = load_file(ckpt / "ema.safetensors")["latent_pos_embed.pos_embed"]  # [64*64, 64]
    assert torch.equal(table.view(96, 96, 64)[:64, :64].reshape(-1, 64), stored)  # position (r, c) = row r*side + c
    image = pipe.text_to_image("a red square", seed=0, num_timesteps=2, width=1536, height=64).image
    assert image.size == (1536, 64)  # wider than the stored table's 1024 px
    sd = load_file(ckpt / "ema.safetensors")
    sd["latent_pos_embed.pos_embed"][2 * 64 + 5] += 0.5  # position (2, 5) of the stored 64x64 table
    save_file(sd, ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match="'latent_pos_embed.pos_embed' differs from the 2-D sin-cos table"):
        load_model(ckpt)
    sd["latent_pos_embed.pos_embed"] = sd["latent_pos_embed.pos_embed"][:4000]  # not a square table
    save_file(sd, ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"has shape \[4000, 64\], the model expects a square table"):
        load_model(ckpt)


def test_stale_max_latent_size_follows_the_stored_table(ckpt, caplog):
    """A config whose max_latent_size (32) is smaller than the stored table (64x64)
    is stale: the table's size is used, with a warning."""
    _set_max_latent_size(ckpt, 32)
    with caplog.at_level("WARNING"):
        config = config_from_checkpoint(ckpt)
    assert config.max_latent_size == 64
    assert "max_latent_size 32 is stale" in caplog.text and "using 64 (images up to 1024 px)" in caplog.text
    model = load_model(ckpt)
    assert model.config.max_latent_size == 64 and model.latent_pos_embed.pos_embed.shape == (64 * 64, 64)


def test_non_finite_adapter_weights_are_refused(tmp_path):
    """A LoRA adapter with a NaN is refused before peft merges it into the weights."""
    from openbagel.train.lora import add_lora, load_adapter, save_adapter
    from openbagel.train.trainer import new_model

    model = add_lora(new_model(preset("tiny-golden")), r=2, alpha=4)
    name, weight = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: tensor '.*lora_B.*' holds 1 NaN"):
        load_adapter(new_model(preset("tiny-golden")), tmp_path / "adapter")


def test_vit_patch_size_other_than_14_round_trips(tmp_path, tiny_dir):
    """A checkpoint whose ViT patch (8) does not divide the published ViT
    stride (14) loads with the transform its openbagel.json names (it was
    refused: the default transform was checked before the file was read)."""
    from dataclasses import replace

    from openbagel.checkpoint import save_checkpoint
    from openbagel.config import ImageTransformConfig
    from openbagel.model.vae import BagelVAE
    from openbagel.train.trainer import new_model

    base = preset("tiny-golden")
    cfg = replace(base, vit=replace(base.vit, patch_size=8), vit_transform=ImageTransformConfig(64, 32, 8))
    save_checkpoint(tmp_path / "ckpt", new_model(cfg), BagelVAE(cfg.vae), tokenizer_dir=tiny_dir)
    loaded = config_from_checkpoint(tmp_path / "ckpt")
    assert loaded.vit.patch_size == 8 and loaded.vit_transform == ImageTransformConfig(64, 32, 8)
    assert loaded == cfg
