"""The web UI (Gradio): Generate, Edit, Understand, Chat and Frames tabs.

``openbagel ui`` serves it alone; ``openbagel serve --ui`` mounts it at
``/ui`` of the HTTP server. Nothing loads at import: :func:`build_ui` reads
only the checkpoint's config (for the default settings), and the weights load
in the background when the app starts (:class:`ModelHandle`).
"""

from __future__ import annotations

import random
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from PIL import Image

from openbagel.config import ImageSizes
from openbagel.errors import OpenBagelError
from openbagel.serve.engine import ModelLoad

#: Aspect-ratio presets of the size control (width : height).
SIZE_PRESETS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16)}
RENORM_TYPES = ("global", "channel", "text_channel")


def preset_size(ratio: str, side: int, step: int = 16) -> tuple[int, int]:
    """``(width, height)`` of an aspect-ratio preset whose longer side is ``side`` pixels,
    the shorter rounded to a multiple of ``step`` (at least ``step``).

    Raises:
        KeyError: a ratio not in :data:`SIZE_PRESETS`.
    """
    w, h = SIZE_PRESETS[ratio]
    short = max(step, round(side * min(w, h) / max(w, h) / step) * step)
    return (side, short) if w >= h else (short, side)


def size_choices(sizes: ImageSizes, side: int) -> list[str]:
    """The aspect-ratio presets whose size (longer side ``side``) the model draws, in
    :data:`SIZE_PRESETS` order (the embedded 64x64 model: ``["1:1"]``)."""
    return [r for r in SIZE_PRESETS if sizes.allows(*preset_size(r, side, sizes.multiple_of))]


class ModelHandle:
    """The UI's way to the model: a :class:`~openbagel.serve.engine.ModelLoad`
    (the server's own under ``serve --ui``), whose failure the page shows.

    Args:
        load: a function building the pipeline, or a ``ModelLoad`` to share.
    """

    def __init__(self, load: Callable[[], object] | ModelLoad):
        self.model = load if isinstance(load, ModelLoad) else ModelLoad(load)

    def start(self) -> None:
        self.model.start()

    def get(self):
        """The loaded pipeline (waits for the load).

        Raises:
            gr.Error: the model failed to load.
        """
        self.start()
        self.model.wait()
        if self.model.value is None:
            raise _Error(f"the model failed to load: {self.model.error}")
        return self.model.value


#: Gradio's upload folders (``.../gradio/<hash>/``), left out of messages.
_UPLOAD_DIR = re.compile(r"(?:/[^/\s'\"]+)*/gradio/[0-9a-f]{16,}/")


def _Error(message: str) -> gr.Error:
    """A message for the page; expected user errors leave no traceback in the log."""
    return gr.Error(message, print_exception=False)


def _friendly(fn):
    """Our errors (bad size, unreadable image...) as a message in the UI, not a stack trace."""

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OpenBagelError as e:  # files named as the user knows them, not by Gradio's upload folder
            raise _Error(_UPLOAD_DIR.sub("", str(e))) from None

    wrapped.__name__ = fn.__name__
    return wrapped


def _seed(value) -> int:
    return secrets.randbelow(2**31) if value is None or value < 0 else int(value)


def _sampling(steps, guidance, image_guidance, lo, hi, shift, renorm, renorm_min) -> dict:
    return dict(
        num_timesteps=int(steps), guidance_scale=float(guidance), image_guidance_scale=float(image_guidance),
        cfg_interval=(float(lo), float(hi)), timestep_shift=float(shift), cfg_renorm_type=renorm,
        cfg_renorm_min=float(renorm_min),
    )  # fmt: skip


def _stepper(progress: gr.Progress, what: str):
    def on_step(step):
        progress((step.index + 1, step.num_steps), desc=what, unit="steps")

    return on_step


def _example_files(folder: Path) -> dict[str, str]:
    """Inputs from the shapes world for the examples, written once to ``folder``."""
    from openbagel.shapes import world
    from openbagel.video import Clip, write_clip

    scene = world.Scene(
        (world.Obj("circle", "red", "large", (0, 0)), world.Obj("square", "blue", "small", (2, 2))), "white"
    )
    files = {"scene": folder / "scene.png", "clip": folder / "clip.gif"}
    world.render(scene).save(files["scene"])
    clip = world.random_clip(random.Random(3))
    write_clip(Clip([clip.render(k) for k in range(len(clip.frames))], 4.0), files["clip"])
    return {k: str(v) for k, v in files.items()}


def build_ui(model: str | Path | None = None, handle: ModelHandle | None = None, **load_kwargs) -> gr.Blocks:
    """The Gradio app for ``model`` (a checkpoint folder; ``None``: the embedded model).

    Only the checkpoint's config is read here; the weights load in the
    background when the app first starts (or through ``handle``, shared with a server).

    Raises:
        CheckpointError: the folder is not a checkpoint.
    """
    from openbagel.checkpoint import resolve_checkpoint_dir
    from openbagel.config import config_from_checkpoint
    from openbagel.pipeline import DEFAULT_MODEL, STYLE_PRESETS

    folder = resolve_checkpoint_dir(DEFAULT_MODEL if model is None else model)
    cfg = config_from_checkpoint(folder)
    if handle is None:
        from openbagel.pipeline import BagelPipeline

        handle = ModelHandle(lambda: BagelPipeline.from_pretrained(folder, **load_kwargs))
    side = max(cfg.t2i.width, cfg.t2i.height)
    sizes_text = f"this model draws {cfg.supported_sizes.describe()}"
    tmp = Path(tempfile.mkdtemp(prefix="openbagel-ui-"))
    examples = _example_files(tmp)

    def advanced(defaults, with_size: bool, edit: bool):
        s = defaults.sampling
        with gr.Accordion("Advanced settings", open=False):
            with gr.Row():
                steps = gr.Slider(
                    2,
                    100,
                    value=s.num_timesteps,
                    step=1,
                    label="Steps (schedule points; the model runs steps - 1 times)",
                )
                seed = gr.Number(-1, precision=0, label="Seed (-1: random)")
            with gr.Row():
                guidance = gr.Slider(0, 15, value=s.guidance_scale, step=0.5, label="Guidance scale (text)")
                image_guidance = gr.Slider(0, 5, value=s.image_guidance_scale, step=0.1, label="Image guidance scale")
            with gr.Row():
                lo = gr.Slider(0, 1, value=s.cfg_interval[0], step=0.05, label="Guidance from t")
                hi = gr.Slider(0, 1, value=s.cfg_interval[1], step=0.05, label="Guidance to t")
                shift = gr.Slider(0.5, 6, value=s.timestep_shift, step=0.5, label="Timestep shift")
            with gr.Row():
                renorm = gr.Dropdown(list(RENORM_TYPES), value=s.cfg_renorm_type, label="Guidance renorm")
                renorm_min = gr.Slider(0, 1, value=s.cfg_renorm_min, step=0.05, label="Renorm minimum")
                choices = ([] if not edit else ["input"]) + size_choices(cfg.supported_sizes, side)
                size = gr.Radio(
                    choices, value=choices[0], label=f"Size (longer side {side} px; {sizes_text})", visible=with_size
                )
        return [steps, guidance, image_guidance, lo, hi, shift, renorm, renorm_min, seed, size]

    def save(img: Image.Image, name: str) -> str:
        path = tmp / f"{name}-{time.time_ns()}.png"
        img.save(path)
        return str(path)

    @_friendly
    def generate(prompt, think, steps, guidance, image_guidance, lo, hi, shift, renorm, renorm_min, seed, size,
                 progress=gr.Progress()):  # fmt: skip
        pipe = handle.get()
        seed = _seed(seed)
        width, height = preset_size(size, side, cfg.supported_sizes.multiple_of)
        r = pipe.text_to_image(
            prompt, width=width, height=height, seed=seed, think=bool(think), on_step=_stepper(progress, "denoising"),
            **_sampling(steps, guidance, image_guidance, lo, hi, shift, renorm, renorm_min),
        )  # fmt: skip
        return save(r.image, "generated"), r.reasoning or "", f"seed {seed}, {width}x{height}"

    @_friendly
    def edit(image, instruction, style, think, steps, guidance, image_guidance, lo, hi, shift, renorm, renorm_min,
             seed, size, progress=gr.Progress()):  # fmt: skip
        if image is None:
            raise _Error("upload an image to edit")
        pipe = handle.get()
        seed = _seed(seed)
        kw = {}
        if size != "input":
            kw["width"], kw["height"] = preset_size(size, side, cfg.supported_sizes.multiple_of)
        r = pipe.edit(
            image, instruction.strip() or None, style=None if style == "none" else style, seed=seed, think=bool(think),
            on_step=_stepper(progress, "denoising"),
            **kw, **_sampling(steps, guidance, image_guidance, lo, hi, shift, renorm, renorm_min),
        )  # fmt: skip
        return save(r.image, "edited"), r.reasoning or "", f"seed {seed}, {r.image.width}x{r.image.height}"

    @_friendly
    def understand(image, question, think, max_new_tokens):
        if not question.strip():
            raise _Error("ask a question")
        pipe = handle.get()
        r = pipe.understand(image, question, think=bool(think), max_new_tokens=int(max_new_tokens) or None)
        return r.text, r.reasoning or ""

    def chat_from(history) -> object:
        pipe = handle.get()
        chat = pipe.chat()
        for role, item in history:
            if role == "assistant":
                chat.add_answer(item)
            elif isinstance(item, Image.Image):
                chat.add_image(item)
            else:
                chat.add_text(item)
        return chat

    @_friendly
    def chat_send(message, history, shown):
        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files", [])
        if not text and not files:
            raise _Error("type a message or attach an image")
        from openbagel.images import load_image

        for f in files:
            try:
                img = load_image(f)
            except OpenBagelError:
                gr.Warning(f"{Path(f).name} is not an image Pillow can read; left out", duration=8)
                continue
            history = [*history, ("user", img)]
            shown = [*shown, {"role": "user", "content": {"path": save(img, "upload")}}]
        if text:
            history = [*history, ("user", text)]
            shown = [*shown, {"role": "user", "content": text}]
            answer = chat_from(history).reply()
            history = [*history, ("assistant", answer)]
            shown = [*shown, {"role": "assistant", "content": answer}]
        return None, history, shown, shown

    @_friendly
    def chat_draw(history, shown, progress=gr.Progress()):
        if not history:
            raise _Error("say what to draw first")
        chat = chat_from(history)
        pipe = handle.get()
        img = chat.generate_image(pipe.image_settings(pipe.config.t2i), on_step=_stepper(progress, "denoising")).image
        history = [*history, ("image", img)]
        shown = [*shown, {"role": "assistant", "content": {"path": save(img, "drawn")}}]
        return history, shown, shown

    @_friendly
    def frames(files, n, context, include_input, seed, progress=gr.Progress()):
        from openbagel.video import Clip, read_clip, write_clip

        if not files:
            raise _Error("upload a clip (GIF, MP4, WebM) or the frames as image files")
        paths = [f if isinstance(f, str) else f.name for f in files]
        clip = read_clip(paths[0] if len(paths) == 1 else paths)
        pipe = handle.get()
        r = pipe.predict_frames(
            clip.frames, int(n), context_frames=int(context) or None, seed=_seed(seed),
            on_step=_stepper(progress, "denoising"),
        )  # fmt: skip
        out = r.images
        if include_input:
            out = [f.resize(out[0].size) for f in clip.frames] + out
        path = tmp / f"frames-{time.time_ns()}.gif"
        write_clip(Clip(out, clip.fps), path)
        return str(path), str(path)

    with gr.Blocks(title="openbagel") as ui:
        title = "the embedded shapes-world model" if model is None else f"`{folder.name}`"
        gr.Markdown(f"# openbagel\nBAGEL in the browser: {title}, images up to {side} px on the longer side.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    g_prompt = gr.Textbox(
                        label="Prompt",
                        elem_id="generate-prompt",
                        lines=2,
                        placeholder="a red circle above a blue square",
                    )
                    g_think = gr.Checkbox(False, label="Think first (the plan is shown beside the image)")
                    g_adv = advanced(cfg.t2i, with_size=True, edit=False)
                    g_run = gr.Button("Generate", elem_id="generate-run", variant="primary")
                with gr.Column():
                    g_out = gr.Image(
                        label="Image",
                        elem_id="generate-image",
                        type="filepath",
                        buttons=["download"],
                        interactive=False,
                        height=320,
                    )
                    g_info = gr.Markdown(elem_id="generate-info")
                    g_reason = gr.Textbox(label="Reasoning", lines=3, interactive=False)
            gr.Examples(
                [
                    ["a red circle above a blue square"],
                    ["a small green triangle in the top left on a black background"],
                    ["two yellow diamonds"],
                ],
                [g_prompt],
            )
            g_run.click(generate, [g_prompt, g_think, *g_adv], [g_out, g_reason, g_info])
            g_prompt.submit(generate, [g_prompt, g_think, *g_adv], [g_out, g_reason, g_info])
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    e_in = gr.Image(label="Image", type="filepath", height=320)
                    e_text = gr.Textbox(label="Instruction", placeholder="make the circle green")
                    e_style = gr.Dropdown(
                        ["none", *STYLE_PRESETS], value="none", label="Style preset (instead of an instruction)"
                    )
                    e_think = gr.Checkbox(False, label="Think first")
                    e_adv = advanced(cfg.edit, with_size=True, edit=True)
                    e_run = gr.Button("Edit", variant="primary")
                with gr.Column():
                    e_out = gr.Image(
                        label="Result", type="filepath", buttons=["download"], interactive=False, height=320
                    )
                    e_info = gr.Markdown()
                    e_reason = gr.Textbox(label="Reasoning", lines=3, interactive=False)
            gr.Examples(
                [[examples["scene"], "make the circle green", "none"], [examples["scene"], "", "pixel"]],
                [e_in, e_text, e_style],
            )
            e_run.click(edit, [e_in, e_text, e_style, e_think, *e_adv], [e_out, e_reason, e_info])
        with gr.Tab("Understand"):
            with gr.Row():
                with gr.Column():
                    u_in = gr.Image(label="Image (optional)", type="filepath", height=320)
                    u_question = gr.Textbox(
                        label="Question", elem_id="understand-question", placeholder="What colour is the circle?"
                    )
                    u_think = gr.Checkbox(False, label="Think first")
                    with gr.Accordion("Advanced settings", open=False):
                        u_max = gr.Slider(0, 512, value=0, step=1, label="Max new tokens (0: the model's default)")
                    u_run = gr.Button("Answer", elem_id="understand-run", variant="primary")
                with gr.Column():
                    u_answer = gr.Textbox(label="Answer", elem_id="understand-answer", interactive=False)
                    u_reason = gr.Textbox(label="Reasoning", lines=3, interactive=False)
            gr.Examples(
                [[examples["scene"], "What colour is the circle?"], [examples["scene"], "How many shapes are there?"]],
                [u_in, u_question],
            )
            u_run.click(understand, [u_in, u_question, u_think, u_max], [u_answer, u_reason])
            u_question.submit(understand, [u_in, u_question, u_think, u_max], [u_answer, u_reason])
        with gr.Tab("Chat"):
            history = gr.State([])
            shown = gr.State([])
            c_box = gr.Chatbot(label="Conversation", height=420)
            c_in = gr.MultimodalTextbox(
                label="Message",
                placeholder="Type a message, attach images",
                file_types=["image"],
                file_count="multiple",
            )
            with gr.Row():
                c_draw = gr.Button("Draw from the conversation")
                c_clear = gr.Button("Clear")
            c_in.submit(chat_send, [c_in, history, shown], [c_in, history, shown, c_box])
            c_draw.click(chat_draw, [history, shown], [history, shown, c_box])
            c_clear.click(lambda: ([], [], [], None), None, [history, shown, c_box, c_in])
            c_box.clear(lambda: ([], []), None, [history, shown])  # the conversation's own trash button
        with gr.Tab("Frames"):
            with gr.Row():
                with gr.Column():
                    f_in = gr.File(label="Clip (GIF, MP4, WebM) or frames (images, in order)", file_count="multiple")
                    f_n = gr.Slider(1, 16, value=2, step=1, label="Frames to predict")
                    f_context = gr.Number(0, precision=0, label="Context frames (0: all)")
                    f_include = gr.Checkbox(True, label="Include the input frames")
                    f_seed = gr.Number(-1, precision=0, label="Seed (-1: random)")
                    f_run = gr.Button("Predict", variant="primary")
                with gr.Column():
                    f_out = gr.Image(label="Clip", type="filepath", buttons=["download"], interactive=False, height=320)
                    f_file = gr.File(label="Download")
            gr.Examples([[[examples["clip"]]]], [f_in])
            f_run.click(frames, [f_in, f_n, f_context, f_include, f_seed], [f_out, f_file])
        ui.load(handle.start)
    return ui
