"""Golden parity: run every case of a golden folder (the format of
``shared/golden``: ``cases.json``, one ``.safetensors`` per case, a tiny
checkpoint) and compare with the reference's outputs.

Each case kind has one runner; everything (sizes, steps, scales, ids,
transforms) is read from the case, nothing is assumed. Used by
``tools/check_golden.py`` and by the test suite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from openbagel.checkpoint import load_model, load_vae
from openbagel.config import PRESETS, ImageTransformConfig, config_from_checkpoint
from openbagel.images import resize, resize_size, to_tensor
from openbagel.inference.generate import FlowStep, decode_tokens, generate_latents
from openbagel.inference.sampling import ImageSampling, TextSampling
from openbagel.inference.session import Session
from openbagel.model.attention import AttnMask
from openbagel.model.bagel import SequenceInput
from openbagel.packing import SpecialIds, flattened_position_ids, patchify, unpatchify
from openbagel.train.losses import (
    add_noise,
    cross_entropy_per_token,
    mse_per_element,
    reduce_losses,
    timesteps_from_logits,
)

#: float32 tolerance: relative L2 error of every tensor output.
REL_TOL = 1e-4
#: bfloat16 tolerances against the float32 golden data: twice the reference's own drift.
BF16_LOGITS_ABS = 0.16
BF16_VELOCITY_REL = 0.036


@dataclass
class CaseResult:
    name: str
    kind: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


class _Checker:
    """Collects comparisons of one case."""

    def __init__(self, result: CaseResult, dtype: torch.dtype):
        self.r = result
        self.bf16 = dtype != torch.float32

    def tensor(
        self, name: str, ours: Tensor, ref: Tensor, *, bf16_rel: float | None = None, bf16_abs: float | None = None
    ) -> None:
        """Relative L2 error <= REL_TOL in float32; in bf16 only the given bounds are enforced."""
        ours, ref = ours.detach().float().cpu().reshape(ref.shape), ref.float()
        diff = (ours - ref).abs()
        max_abs = diff.max().item() if diff.numel() else 0.0
        rel = ((ours - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        self.r.max_abs, self.r.max_rel = max(self.r.max_abs, max_abs), max(self.r.max_rel, rel)
        if not self.bf16:
            if rel > REL_TOL:
                self.r.failures.append(f"{name}: relative error {rel:.3g} > {REL_TOL}")
        else:
            if bf16_rel is not None and rel > bf16_rel:
                self.r.failures.append(f"{name}: relative error {rel:.3g} > {bf16_rel} (bf16)")
            if bf16_abs is not None and max_abs > bf16_abs:
                self.r.failures.append(f"{name}: max error {max_abs:.3g} > {bf16_abs} (bf16)")

    def pixels(self, name: str, ours: Tensor | np.ndarray, ref: Tensor, levels: int = 1) -> None:
        """8-bit images within ``levels`` per pixel (float32 only)."""
        ours_t = ours.to(torch.int64) if isinstance(ours, Tensor) else torch.from_numpy(np.array(ours, dtype=np.int64))
        ref_t = ref.to(torch.int64)
        if ours_t.shape != ref_t.shape:
            self.r.failures.append(f"{name}: shape {list(ours_t.shape)} != {list(ref_t.shape)}")
            return
        worst = (ours_t - ref_t).abs().max().item() if ref_t.numel() else 0
        if worst > levels and not self.bf16:
            self.r.failures.append(f"{name}: pixels differ by up to {worst} levels (> {levels})")

    def equal(self, name: str, ours, ref) -> None:
        ours, ref = torch.as_tensor(ours).tolist(), torch.as_tensor(ref).tolist()
        if ours != ref:
            self.r.failures.append(f"{name}: {ours} != {ref}")


def _transform(d: dict) -> ImageTransformConfig:
    return ImageTransformConfig(int(d["max_image_size"]), int(d["min_image_size"]), int(d["image_stride"]))


class GoldenRunner:
    """Loads a golden folder's checkpoint once and runs its cases.

    ``plain=True`` runs them through the engine's plain path (every guidance
    branch its own pass over a copied context; a segment per decoded token).
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, plain: bool = False):
        self.folder = Path(folder)
        self.plain = plain
        self.cases = json.loads((self.folder / "cases.json").read_text())
        common = self.cases.get("_common", {})
        ckpt = str(common.get("checkpoint", "tiny-random")).split()[0].rstrip("/")
        self.ckpt = self.folder / ckpt
        self.dtype = dtype
        self.config = config_from_checkpoint(self.ckpt)
        self.model = load_model(self.ckpt, dtype=dtype)
        self.vae = load_vae(self.ckpt, dtype=torch.float32)
        ids = common.get("special_token_ids", {})
        extra_path = self.ckpt / "tiny_extra.json"
        if not ids and extra_path.exists():
            ids = json.loads(extra_path.read_text()).get("new_token_ids", {})
        self.special = SpecialIds(ids["bos_token_id"], ids["eos_token_id"], ids["start_of_image"], ids["end_of_image"])

    def names(self) -> list[str]:
        return [k for k in self.cases if not k.startswith("_")]

    def run(self, name: str) -> CaseResult:
        case = self.cases[name]
        result = CaseResult(name, case["kind"])
        runner: Callable = getattr(self, f"_run_{case['kind']}", None)
        if runner is None:
            result.failures.append(f"unknown case kind {case['kind']!r}")
            return result
        from safetensors.torch import load_file

        data = load_file(str(self.folder / case.get("file", f"{name}.safetensors")))
        with torch.no_grad():
            runner(case, data, _Checker(result, self.dtype))
        return result

    # --- helpers ---------------------------------------------------------------

    def _session(self) -> Session:
        return Session(self.model, self.special)

    def _decode(self, session: Session, data: dict, c: _Checker) -> None:
        ref_ids = data["generated"]
        logits: list[Tensor] = []
        ids = list(
            decode_tokens(
                self.model,
                session.full.fork() if self.plain else session.decoding_context(len(ref_ids)),
                self.special,
                TextSampling(max_new_tokens=len(ref_ids)),
                on_logits=logits.append,
                plain=self.plain,
            )
        )
        c.equal("generated", [self.special.bos, *ids][: len(ref_ids)], ref_ids)
        steps = min(len(logits), data["logits"].shape[0])
        c.tensor("first_step_logits", logits[0], data["first_step_logits"], bf16_abs=BF16_LOGITS_ABS)
        c.tensor("logits", torch.stack(logits[:steps]), data["logits"][:steps])

    def _vit_image(self, case: dict, data: dict, image: Image.Image, c: _Checker, session: Session | None) -> None:
        vit_t = _transform(case["vit_transform"])
        pixels = to_tensor(resize(image, vit_t))
        p = self.config.vit.patch_size
        patches = patchify(pixels, p)
        pos = flattened_position_ids(
            pixels.shape[1] // p,
            pixels.shape[2] // p,
            self.config.vit_max_num_patch_per_side,
            self.config.position_mode,
        )
        c.tensor("vit_packed_pixel_values", patches, data["vit_packed_pixel_values"])
        c.equal("vit_position_ids", pos, data["vit_position_ids"])
        n = patches.shape[0]
        vit_out = self.model.vit_model(patches.to(self.model.dtype), pos, [n])
        c.tensor("vit_output", vit_out, data["vit_output"])
        conn = self.model.connector(vit_out)
        c.tensor("connector_output", conn, data["connector_output"])
        c.tensor("vit_pos_embed", self.model.vit_pos_embed(pos), data["vit_pos_embed"])
        c.tensor("vit_token_embeds", self.model.embed_vit(patches, pos, [n]), data["vit_token_embeds"])
        if session is not None:
            session.add_vit_image(patches, pos)

    def _vae_resized(self, case: dict, data: dict, key: str, c: _Checker) -> Image.Image:
        image = Image.fromarray(data[key].numpy(), "RGB")
        resized = resize(image, _transform(case["vae_transform"]))
        c.pixels("image_after_vae_resize_uint8", np.asarray(resized), data["image_after_vae_resize_uint8"])
        return resized

    def _flow(self, case: dict, data: dict, session: Session, c: _Checker) -> None:
        hyper = case["hyper"]
        text_scale, image_scale = float(hyper["cfg_text_scale"]), float(hyper["cfg_img_scale"])
        if text_scale <= 1.0:
            image_scale = 1.0  # the reference runs no guidance at all then (spec 6.4); we differ on purpose
        params = ImageSampling(
            num_timesteps=int(hyper["num_timesteps"]),
            timestep_shift=float(hyper["timestep_shift"]),
            guidance_scale=text_scale,
            image_guidance_scale=image_scale,
            cfg_interval=tuple(hyper["cfg_interval"]),
            cfg_renorm_type=hyper["cfg_renorm_type"],
            cfg_renorm_min=float(hyper["cfg_renorm_min"]),
        )
        n_tok, _ = data["init_noise"].shape
        _, _, lh, lw = data["final_latent"].shape
        down = self.config.vae.downsample
        steps: list[FlowStep] = []
        final = generate_latents(
            self.model,
            session,
            lh * down,
            lw * down,
            params,
            noise=data["init_noise"],
            on_step=steps.append,
            plain=self.plain,
        )
        c.tensor("timesteps", torch.tensor([s.t for s in steps]), data["timesteps"])
        if "steps" in case:  # which steps ran guidance
            ours = [s.v_text_free is not None or s.v_image_free is not None for s in steps]
            ref = [st["cfg_text_scale"] > 1.0 or st["cfg_img_scale"] > 1.0 for st in case["steps"]]
            c.equal("guidance active per step", ours, ref)
        c.tensor("x_t", torch.stack([s.x for s in steps]), data["x_t"])
        c.tensor("velocities", torch.stack([s.v for s in steps]), data["velocities"])
        c.tensor("first_step_velocity", steps[0].v, data["first_step_velocity"], bf16_rel=BF16_VELOCITY_REL)
        c.tensor("first_step_v_cond", steps[0].v_cond, data["first_step_v_cond"], bf16_rel=BF16_VELOCITY_REL)
        if "first_step_v_cfg_text" in data and steps[0].v_text_free is not None:
            c.tensor(
                "first_step_v_cfg_text", steps[0].v_text_free, data["first_step_v_cfg_text"], bf16_rel=BF16_VELOCITY_REL
            )
        if "first_step_v_cfg_img" in data:
            if steps[0].v_image_free is None:
                c.r.failures.append("first_step_v_cfg_img: image-free branch was not run")
            else:
                c.tensor(
                    "first_step_v_cfg_img",
                    steps[0].v_image_free,
                    data["first_step_v_cfg_img"],
                    bf16_rel=BF16_VELOCITY_REL,
                )
        c.tensor("final_latent_packed", final, data["final_latent_packed"])
        latent = unpatchify(
            final,
            lh // self.config.latent_patch_size,
            lw // self.config.latent_patch_size,
            self.config.latent_patch_size,
        )[None]
        c.tensor("final_latent", latent, data["final_latent"])
        decoded = self.vae.decode(latent)
        c.tensor("decoded", decoded, data["decoded"])
        image = ((decoded[0].float() * 0.5 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0).to(torch.uint8)
        c.pixels("image_uint8", image, data["image_uint8"])

    # --- runners ---------------------------------------------------------------

    def _run_components(self, case: dict, data: dict, c: _Checker) -> None:
        from openbagel.model.layers import rope_cos_sin

        c.tensor("vae_decode_out", self.vae.decode(data["vae_decode_in"]), data["vae_decode_out"])
        c.tensor("vae_encoder_out_moments", self.vae.moments(data["vae_encoder_in"]), data["vae_encoder_out_moments"])
        c.tensor("time_embedder_out", self.model.time_embedder(data["time_embedder_t"]), data["time_embedder_out"])
        cos, sin = rope_cos_sin(
            data["rope_positions"], data["rope_cos"].shape[-1], self.config.llm.rope_theta, torch.float32
        )
        c.tensor("rope_cos", cos, data["rope_cos"])
        c.tensor("rope_sin", sin, data["rope_sin"])
        c.tensor("embed_out", self.model.embed_text(data["embed_ids"]), data["embed_out"])

    def _run_text(self, case: dict, data: dict, c: _Checker) -> None:
        session = self._session()
        session.add_text(data["prompt_ids"].tolist())
        c.equal("kv_len", [session.full.cache.length], case.get("kv_lens", [data["prefill_ids"].numel()]))
        c.equal("rope", [session.full.rope], case.get("ropes", [data["prefill_ids"].numel()]))
        for layer in range(self.config.llm.num_layers):
            for kind, get in (("key", session.full.cache.keys), ("value", session.full.cache.values)):
                key = f"prefill_kv_{kind}_layer{layer}"
                if key in data:
                    c.tensor(key, get(layer), data[key])
        self._decode(session, data, c)

    def _run_understanding(self, case: dict, data: dict, c: _Checker) -> None:
        resized = self._vae_resized(case, data, "image_uint8", c)
        session = self._session()
        self._vit_image(case, data, resized, c, session)
        if "kv_lens_after_image" in case:
            c.equal("kv_len_after_image", [session.full.cache.length], case["kv_lens_after_image"])
            c.equal("rope_after_image", [session.full.rope], case["ropes_after_image"])
        session.add_text(data["prompt_ids"].tolist())
        if "kv_lens_after_text" in case:
            c.equal("kv_len_after_text", [session.full.cache.length], case["kv_lens_after_text"])
            c.equal("rope_after_text", [session.full.rope], case["ropes_after_text"])
        self._decode(session, data, c)

    def _run_t2i(self, case: dict, data: dict, c: _Checker) -> None:
        session = self._session()
        session.add_text(data["prompt_ids"].tolist())
        self._flow(case, data, session, c)

    def _run_edit(self, case: dict, data: dict, c: _Checker) -> None:
        resized = self._vae_resized(case, data, "image_uint8_input", c)
        pixels = to_tensor(resized)[None]
        c.tensor("vae_encode_input", pixels, data["vae_encode_input"])
        c.tensor("vae_encoder_moments", self.vae.moments(pixels), data["vae_encoder_moments"])
        latent = self.vae.encode(pixels, noise=data["vae_eps"])
        c.tensor("vae_encoded_latent", latent, data["vae_encoded_latent"])
        session = self._session()
        p = self.config.latent_patch_size
        tokens = patchify(latent[0], p)
        h, w = latent.shape[2] // p, latent.shape[3] // p
        session.add_vae_image(
            tokens, flattened_position_ids(h, w, self.config.max_latent_size, self.config.position_mode)
        )
        self._vit_image(case, data, resized, c, session)
        session.add_text(data["prompt_ids"].tolist())
        self._flow(case, data, session, c)

    def _run_train_forward(self, case: dict, data: dict, c: _Checker) -> None:
        cfg, model = self.config, self.model
        L = int(case["sequence_length"])
        # The reference's block-diagonal per-sample masks -> one dense bool mask.
        mask = torch.zeros(L, L, dtype=torch.bool)
        start = 0
        for i, n in enumerate(case["sample_lens"]):
            mask[start : start + n, start : start + n] = data[f"in_nested_attention_mask_{i}"] == 0
            start += n
        # Reorder the packed sequence: understanding tokens first, generation last.
        gen = data["in_packed_vae_token_indexes"]
        is_gen = torch.zeros(L, dtype=torch.bool)
        is_gen[gen] = True
        order = torch.cat([torch.nonzero(~is_gen).flatten(), gen])
        slot = torch.empty(L, dtype=torch.long)
        slot[order] = torch.arange(L)

        latent = self.vae.encode(data["in_padded_images"], noise=data["vae_eps"])
        c.tensor("padded_latent", latent, data["padded_latent"])
        p = cfg.latent_patch_size
        clean = torch.cat(
            [patchify(lat[:, : h * p, : w * p], p) for lat, (h, w) in zip(latent, case["patchified_vae_latent_shapes"])]
        )
        t = timesteps_from_logits(data["in_packed_timesteps"], float(case["timestep_shift"]))
        x_t, target = add_noise(clean, data["noise"], t)
        inp = SequenceInput(
            positions=data["in_packed_position_ids"][order],
            mask=AttnMask.dense(mask[order][:, order]),
            num_und=L - gen.numel(),
            text_ids=data["in_packed_text_ids"],
            text_indexes=slot[data["in_packed_text_indexes"]],
            vit_patches=data["in_packed_vit_tokens"],
            vit_position_ids=data["in_packed_vit_position_ids"],
            vit_seq_lens=data["in_vit_token_seqlens"].tolist(),
            vit_indexes=slot[data["in_packed_vit_token_indexes"]],
            latents=x_t,
            latent_timesteps=t,
            latent_position_ids=data["in_packed_latent_position_ids"],
            latent_indexes=slot[gen],
        )
        hidden = model(inp)
        ce = cross_entropy_per_token(
            model.logits(hidden[slot[data["in_ce_loss_indexes"]]]), data["in_packed_label_ids"]
        )
        mse = mse_per_element(model.velocity(hidden[slot[data["in_mse_loss_indexes"]]]), target[t > 0])
        c.tensor("ce_per_token", ce, data["ce_per_token"])
        c.tensor("mse_per_element", mse, data["mse_per_element"])
        _, ce_mean, mse_mean = reduce_losses(ce, mse, ce.numel(), mse.shape[0])
        c.tensor("ce_mean", ce_mean, data["ce_mean"])
        w = data["ce_loss_weights"]
        c.tensor("ce_reweighted", (ce * w).sum() / w.sum(), data["ce_reweighted"])
        c.tensor("mse_mean", mse_mean, data["mse_mean"])

    def _run_transforms(self, case: dict, data: dict, c: _Checker) -> None:
        app = PRESETS["7b-mot"]
        transforms = {
            "vae_app": app.vae_transform,
            "vit_app": app.vit_transform,
            "vae_golden": _transform(case["vae_golden"]),
            "vit_golden": _transform(case["vit_golden"]),
        }
        for key, shape in case["output_shapes"].items():
            size, kind = key.split("_", 1)
            t = transforms[kind]
            src = data[f"{size}_input_uint8"]
            if src.dtype == torch.int64:  # only the size is stored
                w, h = src.tolist()
                c.equal(f"{key} shape", [3, *resize_size(w, h, t)[::-1]], shape)
                continue
            out = to_tensor(resize(Image.fromarray(src.numpy(), "RGB"), t))
            c.equal(f"{key} shape", list(out.shape), shape)
            if key in data and list(out.shape) == list(shape):
                c.tensor(key, out, data[key])


def run_all(folder: str | Path, dtype: torch.dtype = torch.float32) -> list[CaseResult]:
    """Run every case of a golden folder."""
    runner = GoldenRunner(folder, dtype)
    return [runner.run(name) for name in runner.names()]
