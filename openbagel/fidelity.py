"""How close a changed model (quantized, offloaded, split) stays to a reference one.

Two measures, each over the same inputs for both pipelines:

* **relative latent error** of text to image: ``||x - x_ref|| / ||x_ref||``
  of the final latents from the same noise (seeded), all prompts together;
* **greedy-token agreement** of understanding: the reference's greedy reply is
  fed to both models (teacher forcing) and the share of positions whose
  argmax token is the same is counted, so one early difference does not
  decide the whole reply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from openbagel.inference.generate import decode_tokens, draw_noise, generate_latents_batch
from openbagel.inference.sampling import TextSampling
from openbagel.inference.session import append
from openbagel.packing import text_segment


@torch.inference_mode()
def final_latents(pipe, prompts: Sequence[str], seed: int = 0, num_timesteps: int | None = None) -> torch.Tensor:
    """``[len(prompts), n, C]`` float32 final latents of text to image (the model's defaults; seed ``seed + i``)."""
    out = []
    for i, prompt in enumerate(prompts):
        chat = pipe.chat()
        chat.add_text(prompt)
        s = pipe.image_settings(pipe.config.t2i, seed=seed + i, num_timesteps=num_timesteps)
        noise = draw_noise(pipe.model, s.height, s.width, s.generator)
        out.append(generate_latents_batch(pipe.model, [chat.session], s.height, s.width, s.sampling, [noise])[0])
    return torch.stack(out).cpu()


def latent_error(ref, other, prompts: Sequence[str], seed: int = 0, num_timesteps: int | None = None) -> float:
    """Relative L2 error of ``other``'s final latents against ``ref``'s (same prompts and noise)."""
    a = final_latents(ref, prompts, seed, num_timesteps)
    b = final_latents(other, prompts, seed, num_timesteps)
    return float((b - a).norm() / a.norm())


def _chat(pipe, image: Image.Image, question: str):
    """A conversation holding ``image`` (ViT path) and ``question``."""
    chat = pipe.chat()
    chat.add_image(image, vae=False)
    chat.add_text(question)
    return chat


def _teacher_forced_argmax(pipe, chat, reply: list[int]) -> list[int]:
    """The argmax next token at every position of ``reply`` read after ``chat``'s context."""
    ctx = chat.session.full
    ids = [chat.session.special.bos, *reply]
    hidden = append(pipe.model, ctx, text_segment(ids, ctx.rope, ctx.device), len(ids))
    return pipe.model.logits(hidden).argmax(-1).tolist()


@torch.inference_mode()
def token_agreement(ref, other, image: Image.Image, questions: Sequence[str], max_new_tokens: int = 16) -> float:
    """Share of reply positions (over all questions) where ``other``'s greedy token equals ``ref``'s.

    The reference decodes each reply greedily; both models then read the
    image, the question and that reply, and their argmax next tokens are compared.
    """
    same = total = 0
    params = TextSampling(max_new_tokens=max_new_tokens)
    for q in questions:
        chat = _chat(ref, image, q)
        ctx = chat.session.decoding_context(params.max_new_tokens)  # extends the context, which stays as it was
        reply = list(decode_tokens(ref.model, ctx, chat.session.special, params))
        a = _teacher_forced_argmax(ref, chat, reply)
        b = _teacher_forced_argmax(other, _chat(other, image, q), reply)
        same += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return same / total
