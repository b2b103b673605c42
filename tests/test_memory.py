"""Less memory: weight-only quantization (int8, fp8, nf4), saving and loading it,
layer offload with prefetch, layers split across devices, and the planner.

CPU "devices" stand in for GPUs: what is checked is the placement logic, the
order of the copies and that the numbers do not change. The quantization floors
are the measured values (benchmarks/RESULTS.md, "Memory") with a margin.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from openbagel import BagelPipeline
from openbagel.cli import app
from openbagel.errors import InvalidInputError
from openbagel.fidelity import latent_error, token_agreement
from openbagel.pipeline import DEFAULT_MODEL, THINK_GENERATE_PROMPT
from openbagel.placement import LayerOffload, describe_placement, layer_devices, place_layers, split_evenly
from openbagel.plan import Workload, make_plan, weight_bytes
from openbagel.quantize import QuantSpec, part_bytes, save_quantized
from openbagel.shapes.eval import make_items
from tests.close import assert_images_close

runner = CliRunner()
CPU = torch.device("cpu")
MODES = ("int8", "fp8", "nf4")

#: Measured on the golden tiny config / the embedded model (bfloat16 reference,
#: benchmarks/quant_quality.py): relative latent error and greedy-token agreement.
#: Floors: the error at most twice the measured one, the agreement at most 5 points lower.
MEASURED = {
    "tiny": {"int8": (0.014, 0.985), "fp8": (0.050, 0.956), "nf4": (0.170, 0.912)},
    "shapes": {"int8": (0.054, 0.75), "fp8": (0.104, 1.0), "nf4": (0.276, 0.75)},
}


@pytest.fixture(scope="module")
def items():
    items = make_items(4, 2024)
    return [i.prompt for i in items if i.task == "t2i"][:4], [i for i in items if i.task == "qa"]


@pytest.fixture(scope="module")
def refs(tiny_dir):
    return {
        "tiny": BagelPipeline.from_pretrained(tiny_dir, dtype="bfloat16"),
        "shapes": BagelPipeline.from_pretrained(dtype="bfloat16"),
    }


def _image(r) -> np.ndarray:
    return np.asarray(r.images[0], dtype=np.int16)


# --- the spec ------------------------------------------------------------------------


def test_spec_parsing():
    assert QuantSpec.parse("llm=int8,vit=nf4") == QuantSpec(llm="int8", vit="nf4")
    assert QuantSpec.parse("NF4") == QuantSpec(llm="nf4")  # a bare mode: the LLM
    assert QuantSpec.parse(None) == QuantSpec() and not QuantSpec().active
    assert str(QuantSpec.parse("vit=int8, llm=fp8")) == "llm=fp8,vit=int8"
    assert str(QuantSpec()) == "none"


@pytest.mark.parametrize(
    "text, words",
    [
        ("llm=int9", "unknown quantization 'int9' for llm"),
        ("lm=int8", "PART=MODE"),
        ("llm", "unknown quantization 'llm'"),
        ("llm=int8,llm=nf4", "given twice"),
        ("vae=int8", "use vae=none"),
    ],
)
def test_spec_errors(text, words):
    with pytest.raises(InvalidInputError, match=words):
        QuantSpec.parse(text)


# --- quantized models -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_quantized_weights_shrink_and_stay_close(refs, items, tiny_dir, mode):
    prompts, qa = items
    for name, folder, image in (
        ("tiny", tiny_dir, Image.new("RGB", (64, 64), (200, 30, 30))),
        ("shapes", None, qa[0].images[0]),
    ):
        ref = refs[name]
        pipe = BagelPipeline.from_pretrained(folder, dtype="bfloat16", quant=f"llm={mode}")
        before, after = part_bytes(ref.model), part_bytes(pipe.model)
        # bf16 is 2 bytes a weight: int8 and fp8 1 (plus a scale per row; biases stay bf16), nf4 about 0.53
        ratio = after["llm"] / before["llm"]
        assert ratio < (0.4 if mode == "nf4" else 0.56), ratio  # exact sizes: test_planned_weights_equal_measured
        assert {k: after[k] for k in ("vit", "head", "other")} == {k: before[k] for k in ("vit", "head", "other")}
        steps = 5 if name == "tiny" else 10
        err = latent_error(ref, pipe, prompts, num_timesteps=steps)
        agree = token_agreement(ref, pipe, image, [q.prompt for q in qa])
        measured_err, measured_agree = MEASURED[name][mode]
        assert 0 < err <= 2 * measured_err, (name, err)
        assert agree >= measured_agree - 0.05, (name, agree)


def test_every_part_and_the_head(tiny_dir, refs):
    pipe = BagelPipeline.from_pretrained(tiny_dir, dtype="bfloat16", quant="llm=nf4,vit=int8,head=int8")
    before, after = part_bytes(refs["tiny"].model), part_bytes(pipe.model)
    assert after["vit"] < 0.6 * before["vit"] and after["head"] < 0.6 * before["head"]
    assert after["other"] == before["other"]  # embeddings, norms, tables, connector, vae2llm/llm2vae untouched
    text = pipe.understand(Image.new("RGB", (64, 64), "red"), "what is this?", max_new_tokens=4).text
    assert text == refs["tiny"].understand(Image.new("RGB", (64, 64), "red"), "what is this?", max_new_tokens=4).text
    assert type(pipe.model.language_model.lm_head.weight).__name__ == "Int8Tensor"
    with pytest.raises(InvalidInputError, match="language_model.lm_head is 64 -> 300"):
        BagelPipeline.from_pretrained(tiny_dir, dtype="bfloat16", quant="head=nf4")  # a 300-token vocabulary
    with pytest.raises(InvalidInputError, match="input sizes that are multiples of 64"):
        BagelPipeline.from_pretrained(quant="vit=nf4")  # the embedded model's ViT is 96 wide


@pytest.mark.parametrize("mode", MODES)
def test_save_and_load_quantized(tmp_path, mode):
    pipe = BagelPipeline.from_pretrained(dtype="bfloat16", quant=f"llm={mode}")
    out = save_quantized(pipe.model, pipe.quant, DEFAULT_MODEL, tmp_path / "q")
    assert not (out / "ema.safetensors").exists() and (out / "quantization.json").exists()
    loaded = BagelPipeline.from_pretrained(out)  # the dtype it was saved in
    assert loaded.quant == QuantSpec(llm=mode) and loaded.model.dtype == torch.bfloat16
    assert part_bytes(loaded.model) == part_bytes(pipe.model)
    a = pipe.text_to_image("a red circle", seed=0, num_timesteps=4)
    b = loaded.text_to_image("a red circle", seed=0, num_timesteps=4)
    assert np.array_equal(_image(a), _image(b))
    with pytest.raises(InvalidInputError, match="quantized as llm="):
        BagelPipeline.from_pretrained(out, quant="llm=int8" if mode != "int8" else "llm=nf4")
    with pytest.raises(InvalidInputError, match="load it with --dtype bfloat16"):
        BagelPipeline.from_pretrained(out, dtype="float32")


def test_quantized_folder_with_its_own_mode_and_failed_saves(tmp_path):
    pipe = BagelPipeline.from_pretrained(dtype="bfloat16", quant="llm=int8")
    out = save_quantized(pipe.model, pipe.quant, DEFAULT_MODEL, tmp_path / "q")
    again = BagelPipeline.from_pretrained(out, quant="int8")  # the mode it holds: loaded, not quantized again
    assert again.quant == QuantSpec(llm="int8") and part_bytes(again.model) == part_bytes(pipe.model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="is a file"):
        save_quantized(pipe.model, pipe.quant, DEFAULT_MODEL, tmp_path / "file")
    blocked = tmp_path / "half"
    (blocked / "model.quantized.safetensors").mkdir(parents=True)  # the weights cannot be written
    with pytest.raises(InvalidInputError, match="not empty"):
        save_quantized(pipe.model, pipe.quant, DEFAULT_MODEL, blocked)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_quantized(pipe.model, pipe.quant, DEFAULT_MODEL, empty) == empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "half", "q"]  # no temporary left
    r = runner.invoke(app, ["quantize", "--quant", "int8", "--model", str(out), "-o", str(tmp_path / "q2")])
    assert r.exit_code == 2 and "is quantized already (llm=int8)" in r.output
    r = runner.invoke(app, ["quantize", "--quant", "int8", "-o", str(tmp_path / "file")])
    assert r.exit_code == 2 and "is a file" in r.output


def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import openbagel.quantize as q

    pipe = BagelPipeline.from_pretrained(dtype="bfloat16", quant="llm=int8")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        q.save_quantized(pipe.model, pipe.quant, DEFAULT_MODEL, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_quantize_cli_then_generate(tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", "--quant", "llm=int8", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "llm=int8" in r.output
    img = tmp_path / "x.png"
    r = runner.invoke(app, ["generate", "a red circle", "--model", str(out), "--seed", "0", "-o", str(img)])
    assert r.exit_code == 0, r.output
    assert Image.open(img).size == (64, 64)
    r = runner.invoke(app, ["quantize", "--quant", "llm=int8", "-o", str(out)])
    assert r.exit_code == 2 and "is not empty" in r.output
    r = runner.invoke(app, ["generate", "x", "--quant", "llm=int4", "-o", str(tmp_path / "y.png")])
    assert r.exit_code == 2 and "unknown quantization 'int4'" in r.output and not (tmp_path / "y.png").exists()


# --- offload and placement ------------------------------------------------------------


def test_offload_same_numbers_and_prefetch_order():
    ref = BagelPipeline.from_pretrained()
    pipe = BagelPipeline.from_pretrained(offload="layers")
    a = ref.text_to_image("a red circle above a blue square", seed=0, num_timesteps=4)
    b = pipe.text_to_image("a red circle above a blue square", seed=0, num_timesteps=4)
    assert_images_close(_image(a), _image(b), "offloaded vs resident")  # weights moved per layer: same maths
    image = a.images[0]
    assert pipe.understand(image, "what is here?").text == ref.understand(image, "what is here?").text

    offload = pipe.offload
    assert isinstance(offload, LayerOffload) and ref.offload is None
    offload.log.clear()
    layers = pipe.model.language_model.model.layers
    stored = [p for p in layers[1].parameters()]
    pipe.understand(image, "hi", max_new_tokens=1)
    n = len(layers)
    # each forward: layer i+1 is copied while layer i runs, and layer 0 of the next forward while the last runs
    forward = [("load", 1), ("free", 0)] + [e for i in range(2, n) for e in (("load", i), ("free", i - 1))]
    forward += [("load", 0), ("free", n - 1)]
    log = offload.log
    assert log[: len(forward)] == forward and len(log) % len(forward) == 0
    assert log == forward * (len(log) // len(forward))
    live = 0
    for kind, _ in [("load", 0)] + log:  # layer 0 was resident from the previous call
        live += 1 if kind == "load" else -1
        assert live <= 2
    assert [p for p in layers[1].parameters()] == stored  # the host copies are back in the module
    assert "the device is the CPU, where the 4 decoder layers already are" in describe_placement(pipe.model)


def test_offload_recovers_from_a_forward_that_raises(monkeypatch):
    pipe = BagelPipeline.from_pretrained(offload="layers")
    layers = pipe.model.language_model.model.layers
    hosts = [e.host for e in pipe.offload.stored[2]]
    mlp = layers[2].mlp

    def boom(x):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        pipe.understand(Image.new("RGB", (64, 64), "red"), "hi", max_new_tokens=1)
    assert [e.module._parameters[e.name] for e in pipe.offload.stored[2] if e.is_param] == [
        h for h, e in zip(hosts, pipe.offload.stored[2]) if e.is_param
    ]
    assert not pipe.offload.lock.locked()
    monkeypatch.undo()
    ref = BagelPipeline.from_pretrained()
    image = Image.new("RGB", (64, 64), "red")
    assert pipe.understand(image, "what is it?").text == ref.understand(image, "what is it?").text


@pytest.mark.parametrize("mode", MODES)
def test_offload_of_a_quantized_model_same_numbers(mode):
    """nf4 included: bitsandbytes repacks its CPU weights in place on the first forward (a bug once)."""
    ref = BagelPipeline.from_pretrained(dtype="bfloat16", quant=mode)
    pipe = BagelPipeline.from_pretrained(dtype="bfloat16", quant=mode, offload="layers")
    for _ in range(2):  # the second run uses what the first left behind
        a = ref.text_to_image("a red circle", seed=0, num_timesteps=3)
        b = pipe.text_to_image("a red circle", seed=0, num_timesteps=3)
        assert_images_close(_image(a), _image(b), "offloaded vs resident")  # weights moved per layer: same maths


def test_layers_split_across_devices_same_numbers():
    ref = BagelPipeline.from_pretrained()
    pipe = BagelPipeline.from_pretrained()
    assert split_evenly(4, 2) == [0, 0, 1, 1] and split_evenly(5, 2) == [0, 0, 0, 1, 1]
    assignment = place_layers(pipe.model, [CPU, CPU])
    assert assignment == [0, 0, 1, 1]
    assert layer_devices(pipe.model) == [CPU] * 4
    assert describe_placement(pipe.model).startswith("placement: layers 0-1 on cpu")
    for kind in ("text_to_image", "edit"):
        args = ("a red circle",) if kind == "text_to_image" else (Image.new("RGB", (64, 64), "white"), "add a circle")
        a = getattr(ref, kind)(*args, seed=0, num_timesteps=4)
        b = getattr(pipe, kind)(*args, seed=0, num_timesteps=4)
        assert_images_close(_image(a), _image(b), f"{kind}: layers split vs on one device")
    with pytest.raises(InvalidInputError, match="placed already"):
        place_layers(pipe.model, [CPU])
    with pytest.raises(InvalidInputError, match="offloaded or split|resident"):
        pipe.compile()


def test_guidance_branches_side_by_side_on_copies():
    """Whole copies on three CPU "devices": each guidance branch of a step on its own copy, same numbers."""
    from openbagel.fidelity import final_latents
    from openbagel.inference.denoise import ParallelQuery
    from openbagel.placement import branch_replicas, replicate_for_branches

    ref = BagelPipeline.from_pretrained()
    pipe = BagelPipeline.from_pretrained()
    replicas = replicate_for_branches(pipe.model, [CPU, CPU, CPU])
    assert len(replicas) == 3 and replicas[0] is pipe.model and branch_replicas(pipe.model) == replicas
    assert describe_placement(pipe.model).startswith("placement: a whole copy of the model on each of cpu, cpu, cpu")
    built = []
    init = ParallelQuery.__init__

    def spy(self, *args):
        init(self, *args)
        built.append([idx for idx, _ in self.parts])

    prompts = ["a red circle above a blue square", "a green triangle"]
    import unittest.mock

    with unittest.mock.patch.object(ParallelQuery, "__init__", spy):
        a = final_latents(ref, prompts, num_timesteps=4)
        b = final_latents(pipe, prompts, num_timesteps=4)
    assert built and all(parts == [[0], [1]] for parts in built)  # full and text-free: one copy each
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    image = Image.new("RGB", (64, 64), "white")
    with unittest.mock.patch.object(ParallelQuery, "__init__", spy):
        e1 = ref.edit(image, "add a red circle", seed=0, num_timesteps=4)
        e2 = pipe.edit(image, "add a red circle", seed=0, num_timesteps=4)
    assert built[-1] == [[0], [1], [2]]  # the three branches of an edit on three copies
    assert np.abs(_image(e1) - _image(e2)).max() <= 1
    with pytest.raises(InvalidInputError, match="placed already"):
        place_layers(pipe.model, [CPU, CPU])
    with pytest.raises(InvalidInputError, match="need several devices"):
        BagelPipeline.from_pretrained(parallel="branches")
    with pytest.raises(InvalidInputError, match="'layers' or 'branches'"):
        BagelPipeline.from_pretrained(parallel="tensor")


def test_kv_cache_per_layer_devices():
    from openbagel.kv_cache import KVCache

    cache = KVCache(3, 2, 4, capacity=8, device=[CPU, CPU, CPU])
    assert cache.num_layers == 3 and cache.capacity == 8 and cache.bytes_per_token == 2 * 3 * 2 * 4 * 4
    with pytest.raises(ValueError, match="2 devices for 3 layers"):
        KVCache(3, 2, 4, device=[CPU, CPU])


def test_device_list_errors():
    with pytest.raises(InvalidInputError, match="names a device twice"):
        BagelPipeline.from_pretrained(device="cpu,cpu")
    with pytest.raises(InvalidInputError, match="offload must be 'layers'"):
        BagelPipeline.from_pretrained(offload="disk")
    # the server checks them before it listens (the model loads in the background afterwards)
    for args, words in ((["--quant", "foo"], "unknown quantization 'foo'"), (["--parallel", "x"], "'layers' or")):
        r = runner.invoke(app, ["serve", "--port", "8931", *args])
        assert r.exit_code == 2 and words in r.output, r.output


# --- the planner ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["none", "llm=int8", "llm=nf4", "llm=fp8,vit=int8,head=int8"])
def test_planned_weights_equal_measured(spec):
    q = QuantSpec.parse(spec)
    pipe = BagelPipeline.from_pretrained(dtype="bfloat16", quant=q)
    plan = weight_bytes(pipe.config, torch.bfloat16, q)
    measured = part_bytes(pipe.model)
    assert plan["layers"] == measured["llm"]
    assert plan["rest"] == measured["vit"] + measured["head"] + measured["other"]
    assert plan["vae"] == sum(t.numel() * t.element_size() for t in pipe.vae.parameters())


@pytest.mark.parametrize("task, think", [("t2i", False), ("edit", False), ("t2i", True), ("edit", True)])
def test_planned_kv_cache_equals_measured(monkeypatch, task, think):
    """The plan's KV cache, given as the budget, is what the session allocates (and it is not refused)."""
    pipe = BagelPipeline.from_pretrained(dtype="bfloat16")
    prompt = "make the circle blue"
    system = len(pipe.tokenizer.encode(THINK_GENERATE_PROMPT))
    workload = Workload(task, 64, 64, think, 24, len(pipe.tokenizer.encode(prompt)))
    plan = make_plan(pipe.config, torch.bfloat16, 2**30, workload, [QuantSpec()], 1, system)
    seen = []
    sample = BagelPipeline._sample

    def spy(self, sessions, *args):
        out = sample(self, sessions, *args)
        seen.append(max(s.cache_bytes for s in sessions))
        return out

    monkeypatch.setattr(BagelPipeline, "_sample", spy)
    pipe.max_cache_bytes = plan.kv
    kw = dict(seed=0, num_timesteps=3, think=think, max_think_tokens=24)
    if task == "t2i":
        pipe.text_to_image(prompt, **kw)
    else:
        pipe.edit(Image.new("RGB", (64, 64), "white"), prompt, **kw)
    assert seen == [plan.kv]


def test_plan_cli_7b():
    r = runner.invoke(app, ["plan", "--config", "7b-mot", "--gpu-mem", "24GiB", "--think"])
    assert r.exit_code == 0, r.output
    table = r.output.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("choice"))
    rows = {line[:26].strip(): line[26:] for line in table[header + 1 :]}
    assert set(rows) == {"bf16", "bf16 + offload", "llm=int8", "llm=int8 + offload", "llm=nf4", "llm=nf4 + offload"}
    fits = {name: re.search(r"\s(yes|no)\s", row).group(1) for name, row in rows.items()}
    # 27.4 GiB of bf16 weights do not fit a 24 GiB card; int8, nf4 and every offload do
    assert fits == {name: "no" if name == "bf16" else "yes" for name in rows}
    assert rows["bf16"].split()[:2] == ["27.4", "GiB"]
    r = runner.invoke(app, ["plan", "--config", "7b-mot", "--gpu-mem", "24GB", "--devices", "2", "--quant", "int8"])
    assert r.exit_code == 0 and "layers split 14/14" in r.output and "llm=int8" in r.output
    assert "24GB was read as 24,000,000,000 bytes (22.4 GiB)" in r.output
    for args, words in (
        (["--gpu-mem", "lots"], "--gpu-mem must be a size"),
        (["--gpu-mem", "24"], "--gpu-mem needs a unit"),
        (["--gpu-mem", "24GiB", "--task", "t2i", "--size", "1000x1000"], "not a multiple of 16"),
        (["--gpu-mem", "24GiB", "--task", "paint"], "unknown task 'paint'"),
        (["--gpu-mem", "24GiB", "--think", "--max-think-tokens", "-100"], "must be 0 or more"),
        (["--gpu-mem", "24GiB", "--devices", "30"], "more than the model's 28 decoder layers"),
    ):
        r = runner.invoke(app, ["plan", "--config", "7b-mot", *args])
        assert r.exit_code == 2 and words in r.output, (args, r.output)
    r = runner.invoke(app, ["plan", "--config", "foo", "--gpu-mem", "24GiB"])
    assert r.exit_code == 2 and "unknown --config 'foo'" in r.output


def test_plan_shares_layers_and_cache_between_devices():
    cfg = BagelPipeline.from_pretrained().config
    one = make_plan(cfg, torch.bfloat16, 2**30, Workload("t2i", 64, 64), [QuantSpec()], 1)
    two = make_plan(cfg, torch.bfloat16, 2**30, Workload("t2i", 64, 64), [QuantSpec()], 2)
    w = weight_bytes(cfg, torch.bfloat16)
    assert two.choices[0].weights == [w["rest"] + w["vae"] + 2 * w["layer"], 2 * w["layer"]]
    assert sum(two.choices[0].weights) == one.choices[0].weights[0]
    # --parallel branches: the whole model on each GPU
    assert two.choices[1].name == "bf16 (branches)" and two.choices[1].weights == [one.choices[0].weights[0]] * 2
    # the offload row keeps the rest and two layers on the GPU, the layers in host memory
    assert one.choices[1].weights == [w["rest"] + w["vae"] + 2 * w["layer"]] and one.choices[1].host == w["layers"]


def test_deepcopy_keeps_plain_model():  # placement state is per model object
    pipe = BagelPipeline.from_pretrained()
    other = copy.deepcopy(pipe.model)
    place_layers(other, [CPU])
    assert describe_placement(pipe.model) is None and describe_placement(other) is not None


def test_eval_shapes_of_a_quantized_model(tmp_path):
    out = tmp_path / "scores.json"
    r = runner.invoke(app, ["eval", "shapes", "--items", "1", "--quant", "int8", "--json", str(out)])
    assert r.exit_code == 0, r.output
    import json

    record = json.loads(out.read_text())
    assert record["quant"] == "int8" and 0 <= record["scores"]["overall"] <= 1
    r = runner.invoke(app, ["ui", "--quant", "int9"])
    assert r.exit_code == 2 and "unknown quantization 'int9'" in r.output


def test_quant_help_names_the_extra():
    """Rich markup used to eat ``[quant]`` from the install hint of --quant."""
    r = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "pip install -e '.[quant]'" in r.output
