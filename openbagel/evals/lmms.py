"""openbagel as an lmms-eval model (``--model openbagel``), in process.

lmms-eval (EvolvingLMMs-Lab/lmms-eval, 0.6 or later) finds it through the
``lmms_eval.models`` entry point this package declares, so with both
installed::

    lmms-eval --model openbagel --model_args pretrained=BAGEL-7B-MoT,device=cuda --tasks mme

``pretrained`` is a checkpoint folder (default: the embedded model). Requests
of ``generate_until`` (every generation-style understanding task) are answered
greedily with the task's ``max_new_tokens`` and cut at its ``until`` strings;
``think=True`` lets the model reason first (the reasoning is not returned).
Log-likelihood tasks are refused with a clear error (the model is used
generatively, as BAGEL's published scores were).
"""

from __future__ import annotations

from lmms_eval.api.model import lmms

from openbagel.errors import InvalidInputError


def manifest():
    """The entry point's payload: lmms-eval's ``ModelManifest`` for ``openbagel`` (imported only by lmms-eval)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="openbagel", simple_class_path="openbagel.evals.lmms.OpenBagel")


def _as_bool(value: object) -> bool:
    """lmms-eval passes ``--model_args`` values as text: ``think=True`` arrives as ``"True"``."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


class OpenBagel(lmms):
    """An openbagel pipeline behind lmms-eval's simple-model interface.

    Args:
        pretrained: checkpoint folder (``None``: the embedded shapes-world model).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        think: reason before answering.
        max_new_tokens: the answer length when a task gives none.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        device: str = "cpu",
        think: bool | str = False,
        max_new_tokens: int | str = 64,
        **kwargs,
    ) -> None:
        super().__init__()
        from openbagel import BagelPipeline

        self.pipe = BagelPipeline.from_pretrained(pretrained or None, device=device)
        self.think = _as_bool(think)
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests) -> list[str]:
        """Answer each request: ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        from PIL import Image

        from openbagel.images import load_image

        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            images = [v if isinstance(v, Image.Image) else load_image(v) for v in visuals]
            max_new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            text = self.pipe.understand(images or None, context, think=self.think, max_new_tokens=max_new).text
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop:
                    text = text.split(stop)[0]
            answers.append(text)
        return answers

    def loglikelihood(self, requests):
        raise InvalidInputError(
            "openbagel answers lmms-eval tasks generatively (generate_until); choose a task whose output_type "
            "is generate_until"
        )

    def generate_until_multi_round(self, requests):
        raise InvalidInputError("openbagel does not take lmms-eval's multi-round tasks yet; use a single-round task")
