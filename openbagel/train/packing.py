"""Training samples -> one packed sequence (BAGEL-SPEC section 8).

A sample is a list of splits: text (``causal``), a clean image seen through
the ViT or the VAE (``full``), or an image to generate (``noise``). Several
samples are concatenated into one sequence; attention stays inside each
sample. The layout follows the reference packer token for token (golden
case 5 checks it), in the sequence's natural order; :meth:`PackedBatch.model_input`
then reorders it understanding-first for the model.

Rotary positions: a text split counts up; a clean image (ViT or VAE) shares
one position and advances the counter by 1; an image to generate does not
advance it (so a clean copy of it that follows sits at the same position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from openbagel.config import BagelConfig
from openbagel.model.attention import AttnMask
from openbagel.model.bagel import SequenceInput
from openbagel.packing import SpecialIds, flattened_position_ids, patchify, sample_attention_mask


@dataclass
class TextSplit:
    """``[BOS] ids [EOS]``, causal.

    Attributes:
        ids: token ids of the text (no specials).
        loss: train on it: ``[BOS] text`` predict ``text [EOS]``.
        eos_label: if set, the EOS position predicts this id (for example
            ``<|vision_start|>`` when an image follows).
        condition: a conditioning input that condition dropout may remove
            (so the unconditional branches of guidance get trained).
    """

    ids: list[int]
    loss: bool = False
    eos_label: int | None = None
    condition: bool = False


@dataclass
class ImageSplit:
    """``<|vision_start|> tokens <|vision_end|>`` at one rotary position.

    Attributes:
        pixels: ``[3, H, W]`` in [-1, 1], already resized for its path (H, W
            multiples of the ViT patch or of the VAE downsample x latent patch).
        path: ``"vit"`` (understanding tokens) or ``"vae"`` (latent tokens, generation expert).
        loss: a VAE image to generate (a ``noise`` split) instead of a clean one.
        condition: a conditioning image that condition dropout may remove.
    """

    pixels: Tensor
    path: str = "vae"
    loss: bool = False
    condition: bool = False

    def __post_init__(self) -> None:
        if self.path not in ("vit", "vae"):
            raise ValueError(f"image path must be 'vit' or 'vae', got {self.path!r}")
        if self.loss and self.path != "vae":
            raise ValueError("only VAE images can be generated (loss=True needs path='vae')")


Split = TextSplit | ImageSplit
Sample = list[Split]


@dataclass(frozen=True)
class CondDropout:
    """Probabilities of dropping a conditioning split while packing (the reference's defaults)."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3

    def __post_init__(self) -> None:
        for name in ("text", "vit", "vae"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"condition dropout {name} must be in [0, 1], got {getattr(self, name)}")

    def drops(self, split: Split, rng: torch.Generator | None) -> bool:
        if not split.condition:
            return False
        p = self.text if isinstance(split, TextSplit) else getattr(self, split.path)
        return p > 0 and torch.rand((), generator=rng).item() < p


@dataclass
class PackedBatch:
    """One packed sequence, in natural (reference) order.

    Index tensors address the ``length`` slots of the sequence. VAE images
    are kept as pixels (encoded inside the training step, without gradients).
    """

    length: int
    sample_lens: list[int]
    split_lens: list[list[int]]
    split_modes: list[list[str]]
    position_ids: Tensor
    text_ids: Tensor
    text_indexes: Tensor
    vit_patches: Tensor
    vit_position_ids: Tensor
    vit_seq_lens: list[int]
    vit_indexes: Tensor
    vae_images: list[Tensor]
    vae_latent_shapes: list[tuple[int, int]]
    vae_loss: list[bool]
    latent_position_ids: Tensor
    latent_indexes: Tensor
    ce_indexes: Tensor
    ce_labels: Tensor
    mse_indexes: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def num_ce_tokens(self) -> int:
        return self.ce_indexes.numel()

    @property
    def num_mse_tokens(self) -> int:
        return self.mse_indexes.numel()

    def attention_mask(self) -> Tensor:
        """Bool ``[L, L]``: block-diagonal over samples, each block from its splits."""
        mask = torch.zeros(self.length, self.length, dtype=torch.bool)
        start = 0
        for n, lens, modes in zip(self.sample_lens, self.split_lens, self.split_modes):
            mask[start : start + n, start : start + n] = sample_attention_mask(lens, modes)
            start += n
        return mask

    def token_metadata(self) -> MaskMetadata:
        """Per-token sample, split and mode, from which :func:`allowed` decides
        attention without an ``[L, L]`` tensor (the form flex attention's
        ``mask_mod`` takes)."""
        sample, split, mode = [], [], []
        split_id = 0
        for s_id, (lens, modes) in enumerate(zip(self.split_lens, self.split_modes)):
            for n, m in zip(lens, modes):
                sample += [s_id] * n
                split += [split_id] * n
                mode += [_MODES[m]] * n
                split_id += 1
        t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return MaskMetadata(t(sample), t(split), t(mode), torch.arange(self.length))

    def order(self) -> tuple[Tensor, Tensor]:
        """``(order, slot)``: the understanding-first order of the slots, and each slot's place in it."""
        is_gen = torch.zeros(self.length, dtype=torch.bool)
        is_gen[self.latent_indexes] = True
        order = torch.cat([torch.nonzero(~is_gen).flatten(), self.latent_indexes])
        slot = torch.empty(self.length, dtype=torch.long)
        slot[order] = torch.arange(self.length)
        return order, slot

    def model_input(
        self, latents: Tensor, timesteps: Tensor, device: torch.device | str = "cpu", flex: bool | None = None
    ) -> tuple[SequenceInput, Tensor]:
        """The model's input (understanding first) on ``device``, and ``slot``
        (on ``device`` too), mapping natural indexes to the model's order.

        The attention mask is a flex-attention block mask when ``flex`` (default:
        on CUDA), else a dense ``[L, L]`` bool tensor.

        Args:
            latents: ``[n_lat, p*p*z]`` latent tokens (noised where generated), in natural order.
            timesteps: ``[n_lat]`` flow time of each latent token (0 for clean images).
        """
        order, slot = self.order()
        if flex is None:
            flex = torch.device(device).type == "cuda"  # flex attention's backward needs a GPU
        if flex:
            mask = AttnMask.flex(flex_block_mask(self.token_metadata().permute(order), self.length, device))
        else:
            mask = AttnMask.dense(self.attention_mask()[order][:, order].to(device))
        inp = SequenceInput(
            positions=self.position_ids[order].to(device),
            mask=mask,
            num_und=self.length - self.latent_indexes.numel(),
            text_ids=self.text_ids.to(device),
            text_indexes=slot[self.text_indexes].to(device),
            vit_patches=self.vit_patches.to(device),
            vit_position_ids=self.vit_position_ids.to(device),
            vit_seq_lens=self.vit_seq_lens,
            vit_indexes=slot[self.vit_indexes].to(device),
            latents=latents.to(device),
            latent_timesteps=timesteps.to(device),
            latent_position_ids=self.latent_position_ids.to(device),
            latent_indexes=slot[self.latent_indexes].to(device),
        )
        return inp, slot.to(device)


_MODES = {"causal": 0, "full": 1, "noise": 2}


@dataclass
class MaskMetadata:
    """Per-token ``[L]`` tensors describing a packed sequence's attention rule."""

    sample: Tensor
    split: Tensor
    mode: Tensor
    index: Tensor

    def permute(self, order: Tensor) -> MaskMetadata:
        return MaskMetadata(self.sample[order], self.split[order], self.mode[order], self.index[order])


def allowed(meta: MaskMetadata, q: Tensor, kv: Tensor) -> Tensor:
    """Whether query token ``q`` may attend to key token ``kv`` (broadcasting index tensors).

    Same sample only; a key in an earlier split, or in the query's own split
    (causally for text); and no key inside a ``noise`` split except for
    queries of that split (spec section 8).
    """
    same_split = meta.split[q] == meta.split[kv]
    within = same_split & ((meta.mode[q] != _MODES["causal"]) | (meta.index[kv] <= meta.index[q]))
    earlier = (meta.split[kv] < meta.split[q]) & (meta.mode[kv] != _MODES["noise"])
    return (meta.sample[q] == meta.sample[kv]) & (earlier | within)


def flex_block_mask(meta: MaskMetadata, length: int, device: torch.device | str):
    """A flex-attention ``BlockMask`` of :func:`allowed` for a sequence of ``length`` tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    meta = MaskMetadata(*(t.to(device) for t in (meta.sample, meta.split, meta.mode, meta.index)))

    def mask_mod(b, h, q, kv):
        return allowed(meta, q, kv)

    return create_block_mask(mask_mod, None, None, length, length, device=str(device))


def pack(
    samples: list[Sample],
    config: BagelConfig,
    special: SpecialIds,
    dropout: CondDropout | None = None,
    rng: torch.Generator | None = None,
) -> PackedBatch:
    """Pack samples into one sequence the way the reference packer does.

    With ``dropout``, conditioning splits are dropped at random (from ``rng``):
    a dropped text advances nothing, a dropped image still advances the
    rotary counter by 1 (as the reference does).

    Raises:
        ValueError: an image whose size does not fit its path's patch grid.
    """
    L = lambda: torch.zeros(0, dtype=torch.long)  # noqa: E731
    text_ids: list[int] = []
    text_idx: list[int] = []
    pos: list[int] = []
    vit_patches, vit_pos, vit_lens, vit_idx = [], [], [], []
    vae_images, vae_shapes, vae_loss, lat_pos, lat_idx, mse_idx = [], [], [], [], [], []
    ce_idx: list[int] = []
    ce_lab: list[int] = []
    sample_lens, split_lens, split_modes = [], [], []
    cur = 0
    vit_p, lat_down = config.vit.patch_size, config.latent_downsample
    for sample in samples:
        rope = 0
        lens, modes = [], []
        start = cur
        for split in sample:
            if dropout is not None and dropout.drops(split, rng):
                rope += 0 if isinstance(split, TextSplit) else 1
                continue
            if isinstance(split, TextSplit):
                n = len(split.ids) + 2
                text_ids += [special.bos, *split.ids, special.eos]
                text_idx += range(cur, cur + n)
                if split.loss:  # [BOS] text -> text [EOS]
                    ce_idx += range(cur, cur + n - 1)
                    ce_lab += [*split.ids, special.eos]
                if split.eos_label is not None:
                    ce_idx.append(cur + n - 1)
                    ce_lab.append(split.eos_label)
                pos += range(rope, rope + n)
                rope += n
                modes.append("causal")
            else:
                _, H, W = split.pixels.shape
                if split.path == "vit":
                    if H % vit_p or W % vit_p:
                        raise ValueError(f"ViT image {W}x{H} is not a multiple of the patch size {vit_p}")
                    patches = patchify(split.pixels, vit_p)
                    n_tok = patches.shape[0]
                    vit_patches.append(patches)
                    vit_pos.append(
                        flattened_position_ids(
                            H // vit_p, W // vit_p, config.vit_max_num_patch_per_side, config.position_mode
                        )
                    )
                    vit_lens.append(n_tok)
                    vit_idx += range(cur + 1, cur + 1 + n_tok)
                else:
                    if H % lat_down or W % lat_down:
                        raise ValueError(f"VAE image {W}x{H} is not a multiple of {lat_down}")
                    h, w = H // lat_down, W // lat_down
                    n_tok = h * w
                    vae_images.append(split.pixels)
                    vae_shapes.append((h, w))
                    vae_loss.append(split.loss)
                    lat_pos.append(flattened_position_ids(h, w, config.max_latent_size, config.position_mode))
                    lat_idx += range(cur + 1, cur + 1 + n_tok)
                    if split.loss:
                        mse_idx += range(cur + 1, cur + 1 + n_tok)
                n = n_tok + 2
                text_ids += [special.start_of_image, special.end_of_image]
                text_idx += [cur, cur + n - 1]
                pos += [rope] * n
                if not split.loss:  # an image to generate does not advance the counter
                    rope += 1
                modes.append("noise" if split.loss else "full")
            lens.append(n)
            cur += n
        sample_lens.append(cur - start)
        split_lens.append(lens)
        split_modes.append(modes)

    def long(v) -> Tensor:
        return torch.tensor(v, dtype=torch.long) if len(v) else L()

    return PackedBatch(
        length=cur,
        sample_lens=sample_lens,
        split_lens=split_lens,
        split_modes=split_modes,
        position_ids=long(pos),
        text_ids=long(text_ids),
        text_indexes=long(text_idx),
        vit_patches=torch.cat(vit_patches) if vit_patches else torch.zeros(0, 3 * vit_p * vit_p),
        vit_position_ids=torch.cat(vit_pos) if vit_pos else L(),
        vit_seq_lens=vit_lens,
        vit_indexes=long(vit_idx),
        vae_images=vae_images,
        vae_latent_shapes=vae_shapes,
        vae_loss=vae_loss,
        latent_position_ids=torch.cat(lat_pos) if lat_pos else L(),
        latent_indexes=long(lat_idx),
        ce_indexes=long(ce_idx),
        ce_labels=long(ce_lab),
        mse_indexes=long(mse_idx),
    )
