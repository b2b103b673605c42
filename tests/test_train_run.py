"""`openbagel train`: a config end to end, its log and export, and bad configs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from openbagel import BagelPipeline
from openbagel.cli import app

ROOT = Path(__file__).parent.parent
runner = CliRunner()


def test_example_config_runs_and_exports(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(ROOT / "configs" / "example-tiny.yaml"), "-o", str(out), "--max-steps", "4"])
    assert r.exit_code == 0, r.output
    assert "trained 4 steps" in r.output
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4
    assert {"step", "loss_ce", "loss_mse", "tokens_per_s", "lr"} <= set(records[-1])
    assert records[-1]["tokens_per_s"] > 0 and records[-1]["loss_ce"] > 0
    pipe = BagelPipeline.from_pretrained(out / "checkpoint")
    assert pipe.text_to_image("a red square", seed=0, num_timesteps=2).image.size == (64, 64)


def _close(a: float | None, b: float | None, rel: float) -> bool:
    """Equal within ``rel``, or both None (no loss tokens in the logged interval)."""
    return (a is None and b is None) or (a is not None and b is not None and b == pytest.approx(a, rel=rel))


def test_log_records_are_token_weighted_interval_means():
    from types import SimpleNamespace

    from openbagel.train.run import _Interval

    interval = _Interval()
    interval.add(SimpleNamespace(loss=3.0, loss_ce=2.0, num_ce_tokens=10, loss_mse=1.0, num_mse_tokens=4))
    interval.add(SimpleNamespace(loss=0.5, loss_ce=0.0, num_ce_tokens=0, loss_mse=0.5, num_mse_tokens=12))
    assert interval.means() == {"loss": 1.75, "loss_ce": 2.0, "loss_mse": (4 * 1.0 + 12 * 0.5) / 16}
    empty = _Interval()
    empty.add(SimpleNamespace(loss=0.5, loss_ce=0.0, num_ce_tokens=0, loss_mse=0.5, num_mse_tokens=12))
    assert empty.means()["loss_ce"] is None


def _train_in_subprocess(config: Path, output: Path, env: dict) -> None:
    """``openbagel train CONFIG -o OUTPUT`` in a fresh process (one rank)."""
    import subprocess
    import sys

    one = subprocess.run(
        [sys.executable, "-m", "openbagel.cli", "train", str(config), "-o", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]


def _config(tmp_path, tiny_dir, **overrides) -> Path:
    cfg = {
        "model": {"init": "scratch", "preset": "tiny-golden", "assets": str(tiny_dir)},
        "data": [{"kind": "shapes", "count": 4, "tasks": ["t2i", "qa"]}],
        "batch": {"max_tokens": 256},
        "optim": {"max_steps": 2, "lr": 1e-3},
        "log_every": 1,
    }
    cfg.update(overrides)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optimizer": {}}, "unknown section"),
        ({"data": []}, "'data' must be a non-empty list"),
        ({"data": [{"kind": "webdataset", "path": "x"}]}, "unknown kind 'webdataset'"),
        ({"data": [{"kind": "t2i_parquet", "path": "missing.parquet"}]}, "does not exist"),
        ({"optim": {"learning_rate": 1}}, "'optim': unknown field"),
        ({"optim": {"schedule": "linear"}}, "schedule must be"),
        ({"model": {"init": "scratch"}}, "needs 'preset'"),
        ({"lora": True}, "'lora' must be a mapping"),
        ({"lora": {"r": 0}}, "r must be a positive integer"),
        ({"seed": "abc"}, "seed must be an integer"),
        ({"data": [{"kind": "shapes", "weight": 0}]}, "weight must be a finite number > 0"),
        ({"data": [{"kind": "shapes", "wieght": 3}]}, "unknown field(s) ['wieght']"),
        ({"optim": {"max_steps": 3.5}}, "'optim.max_steps' must be int"),
        ({"optim": {"betas": 0.9}}, "'optim.betas' must be a pair of numbers"),
        ({"optim": {"lr": "fast"}}, "'optim.lr' must be float"),
        ({"data": [{"kind": "shapes", "tasks": ["dance"]}]}, "unknown shapes task(s) ['dance']"),
        ({"data": [{"kind": "shapes", "split": "val"}]}, "split must be one of train, test, all"),
        ({"data": [{"kind": "shapes", "unspecified": "centre"}]}, "unspecified must be 'random' or 'default'"),
        ({"data": [{"kind": "Shapes", "count": 10, "unspecified": "default"}]}, "unknown kind 'Shapes'"),
        ({"data": [{"kind": "shapes", "tasks": ["t2i"], "weights": [1, 2]}]}, "one finite number >= 0 per task"),
        ({"data": [{"kind": "shapes", "weights": [1e308, 1e308], "tasks": ["t2i", "qa"]}]}, "finite number"),
        ({"data": [{"kind": "shapes", "weight": "inf"}]}, "weight must be a finite number > 0"),
        ({"data": [{"kind": "t2i_parquet", "path": 3}]}, "needs 'path': a file or folder path, got 3"),
        ({"data": [{"kind": "t2i_parquet", "path": "."}]}, "is a folder; give the parquet file"),
        ({"model": {"init": 5}}, "init must be 'scratch' or a checkpoint folder"),
        ({"model": {"init": "scratch", "preset": ["x"], "assets": "."}}, "preset must be a preset name"),
        ({"model": {"init": "missing-folder"}, "data": [{"kind": "nope"}]}, "unknown kind 'nope'"),  # data first
        ({"device": "tpu"}, "'device' must be auto, cpu or cuda"),
        ({"precision": "fp16"}, "'precision' must be fp32 or bf16"),
        ({"parallel": "zero3"}, "'parallel' must be auto, ddp or fsdp"),
        ({"lora": {"r": 4}, "export_every": 1}, "export_every does not apply to LoRA runs"),
    ],
)
def test_bad_configs(tmp_path, tiny_dir, overrides, message):
    r = runner.invoke(app, ["train", str(_config(tmp_path, tiny_dir, **overrides)), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_bad_rows_stop_or_are_skipped(tmp_path, tiny_dir):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(buf, format="PNG")
    rows = [{"image": buf.getvalue(), "caption": "red"}, {"image": b"broken", "caption": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t2i.parquet")
    cfg = _config(tmp_path, tiny_dir, data=[{"kind": "t2i_parquet", "path": "t2i.parquet"}])
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "o1")])
    assert r.exit_code == 2 and "t2i.parquet, row 2: not an image file" in r.output
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "o2"), "--skip-bad-rows"])
    assert r.exit_code == 0, r.output
    assert "skipped 1 bad row" in r.output and "row 2" in r.output


def test_exact_resume(tmp_path, tiny_dir):
    """6 steps straight == 3 steps, stop, resume, 3 more: same weights and optimiser state."""
    import torch
    from safetensors.torch import load_file

    from openbagel.train.run import train

    cfg = _config(tmp_path, tiny_dir, optim={"max_steps": 6, "lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"})
    quiet = dict(progress=False, echo=lambda s: None)
    straight = train(cfg, tmp_path / "a", **quiet)
    train(cfg, tmp_path / "b", stop_at=3, **quiet)
    resumed = train(cfg, tmp_path / "b", resume=True, **quiet)
    assert straight.steps == resumed.steps == 6
    wa = load_file(tmp_path / "a" / "checkpoint" / "ema.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint" / "ema.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    log_b = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_b == [1, 2, 3, 4, 5, 6]
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "c"), "--resume"])
    assert r.exit_code == 2 and "no run folder" in r.output and "run without --resume first" in r.output
    # a run killed while its model was built leaves an empty folder: --resume starts it at step 0
    (tmp_path / "d").mkdir()
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "d"), "--resume", "--max-steps", "1"])
    assert r.exit_code == 0 and "starting at step 0" in r.output, r.output
    assert (tmp_path / "d" / "checkpoint" / "ema.safetensors").is_file()


def test_lora_run_and_adapter_loading(tmp_path, tiny_dir):
    cfg = _config(tmp_path, tiny_dir, lora={"r": 4, "alpha": 8, "merge": False})
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    out = tmp_path / "img.png"
    r = runner.invoke(
        app,
        [
            "generate",
            "a red square",
            "-o",
            str(out),
            "--steps",
            "2",
            "--model",
            str(tmp_path / "run" / "checkpoint"),
            "--adapter",
            str(adapter),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "x", "-o", str(out), "--model", str(tiny_dir), "--adapter", str(tmp_path)])
    assert r.exit_code == 2 and "not a LoRA adapter folder" in r.output
    bad = _config(tmp_path, tiny_dir, lora={"targets": "nothing_matches_this"})
    r = runner.invoke(app, ["train", str(bad), "-o", str(tmp_path / "run2")])
    assert r.exit_code == 2 and "match no linear layer" in r.output


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, tiny_dir):
    """torchrun with 2 processes (gloo, DDP), one pack each == 1 process taking both packs."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    def cfg(accumulation: int, name: str) -> Path:
        return _config(
            tmp_path,
            tiny_dir,
            batch={"max_tokens": 200, "accumulation": accumulation},
            optim={"max_steps": 3, "lr": 1e-3},
            data=[{"kind": "shapes", "count": 6, "tasks": ["t2i", "qa"]}],
        ).rename(tmp_path / name)

    single, double = cfg(2, "single.yaml"), cfg(1, "ddp.yaml")
    # one thread per process on both sides, so the arithmetic is the same: with
    # Adam's tiny eps, even rounding noise in near-zero gradients moves weights by ~lr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    _train_in_subprocess(single, tmp_path / "one", env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "openbagel.cli"]
    proc = subprocess.run(
        [*cmd, "train", str(double), "-o", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 3 steps") == 1  # only rank 0 reports
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(one, two, strict=True):
        for key in ("loss_ce", "loss_mse"):
            assert _close(a[key], b[key], 1e-5), (a, b)
    wa = load_file(tmp_path / "one" / "checkpoint" / "ema.safetensors")
    wb = load_file(tmp_path / "two" / "checkpoint" / "ema.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_init_from_checkpoint_is_strict(tmp_path, tiny_dir):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    sd = load_file(ckpt / "ema.safetensors")
    del sd["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"]
    save_file(sd, ckpt / "ema.safetensors")
    cfg = _config(tmp_path, tiny_dir, model={"init": str(ckpt)})
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "missing tensor 'language_model.model.layers.1.mlp_moe_gen.up_proj.weight'" in r.output
    # fine-tuning the intact checkpoint works, and only what is not frozen moves
    shutil.copy(tiny_dir / "ema.safetensors", ckpt / "ema.safetensors")
    cfg = _config(tmp_path, tiny_dir, model={"init": str(ckpt), "freeze": ["llm"]})
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    before, after = load_file(ckpt / "ema.safetensors"), load_file(tmp_path / "ft" / "checkpoint" / "ema.safetensors")
    assert torch.equal(before["language_model.lm_head.weight"], after["language_model.lm_head.weight"])
    assert not torch.equal(before["vae2llm.weight"], after["vae2llm.weight"])


def test_bad_batch_section(tmp_path, tiny_dir):
    r = runner.invoke(
        app, ["train", str(_config(tmp_path, tiny_dir, batch={"max_tokens": "lots"})), "-o", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "max_tokens must be a positive integer" in r.output


def test_yaml_numbers_and_existing_runs(tmp_path, tiny_dir):
    # YAML 1.1 reads 1e-4 as a string; it is accepted as the number it means
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {{init: scratch, preset: tiny-golden, assets: {tiny_dir}}}\n"
        "data: [{kind: shapes, count: 4}]\n"
        "optim: {lr: 1e-4, max_steps: 1}\n"
    )
    r = runner.invoke(app, ["train", str(path), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "log.jsonl").read_text().splitlines()[-1])["lr"] == 1e-4
    r = runner.invoke(app, ["train", str(path), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "already holds a run" in r.output
    bad = _config(
        tmp_path, tiny_dir, model={"init": "scratch", "preset": "tiny-golden", "assets": str(tiny_dir), "freeze": "vit"}
    )
    r = runner.invoke(app, ["train", str(bad), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "freeze must be a list" in r.output


def test_lora_runs_are_reproducible(tmp_path, tiny_dir):
    import torch
    from safetensors.torch import load_file

    cfg = _config(tmp_path, tiny_dir, lora={"r": 4})
    for name in ("a", "b"):
        r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_two_ranks_resume_equal_one_rank(tmp_path, tiny_dir):
    """torchrun, 2 processes, FSDP2 over gloo, one single-sample pack each (so the
    ViT is unused on one rank and the generation expert on the other), stopped
    after 2 steps and resumed from the sharded state == 1 process taking both
    packs by accumulation, 4 steps straight."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    def cfg(name: str, accumulation: int, **extra) -> Path:
        return _config(
            tmp_path,
            tiny_dir,
            batch={"max_tokens": 20, "accumulation": accumulation},  # every sample packed alone
            # an eps above rounding noise: the k-projection biases have exactly zero
            # gradient in theory, and Adam with eps 1e-15 would turn their noise into lr-sized steps
            optim={"max_steps": 4, "lr": 1e-3, "eps": 1e-6},
            data=[{"kind": "shapes", "count": 6, "tasks": ["t2i", "qa"]}],
            **extra,
        ).rename(tmp_path / name)

    single, fsdp = cfg("single.yaml", 2), cfg("fsdp.yaml", 1, parallel="fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    _train_in_subprocess(single, tmp_path / "one", env)
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\nfrom openbagel.train.run import train\n"
        "train(sys.argv[1], sys.argv[2], resume=sys.argv[3] == '1', stop_at=int(sys.argv[4]), progress=False)\n"
    )
    for resume, stop in (("0", 2), ("1", 4)):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(driver)]
            + [str(fsdp), str(tmp_path / "two"), resume, str(stop)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        for key in ("loss_ce", "loss_mse", "grad_norm"):  # grad_norm: gradients reduced at the right scale
            assert _close(a[key], b[key], 1e-5), (a["step"], key)
    wa = load_file(tmp_path / "one" / "checkpoint" / "ema.safetensors")
    wb = load_file(tmp_path / "two" / "checkpoint" / "ema.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compute_settings():
    import torch

    from openbagel.train.run import ConfigError, compute_settings

    c = compute_settings({"device": "cpu"})
    assert (c.device, c.precision, c.parallel) == (torch.device("cpu"), "fp32", "none")
    c = compute_settings({"device": "cpu", "precision": "bf16"}, environ={"WORLD_SIZE": "2"})
    assert (c.precision, c.parallel) == ("bf16", "ddp")  # auto: DDP on CPU
    assert compute_settings({"device": "cpu", "parallel": "fsdp"}, environ={"WORLD_SIZE": "2"}).parallel == "fsdp"
    assert compute_settings({"device": "cpu", "parallel": "fsdp"}).parallel == "none"  # one process
    with pytest.raises(ConfigError, match="LoRA runs use 'parallel: ddp'"):
        compute_settings({"device": "cpu", "parallel": "fsdp"}, lora=True, environ={"WORLD_SIZE": "2"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no GPU"):
            compute_settings({"device": "cuda"})


def test_bf16_mixed_precision_run(tmp_path, tiny_dir):
    """precision: bf16 trains with bfloat16 compute and float32 weights; its losses
    follow the float32 run closely."""
    import torch
    from safetensors.torch import load_file

    logs = {}
    for precision in ("fp32", "bf16"):
        cfg = _config(tmp_path, tiny_dir, precision=precision, optim={"max_steps": 3, "lr": 1e-3})
        r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / precision)])
        assert r.exit_code == 0, r.output
        logs[precision] = [json.loads(line) for line in (tmp_path / precision / "log.jsonl").read_text().splitlines()]
    for a, b in zip(logs["fp32"], logs["bf16"], strict=True):
        assert _close(a["loss_ce"], b["loss_ce"], 2e-2) and _close(a["loss_mse"], b["loss_mse"], 2e-2)
        assert a["loss"] != b["loss"]
    weights = load_file(tmp_path / "bf16" / "checkpoint" / "ema.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_periodic_exports_hold_the_ema_weights(tmp_path, tiny_dir):
    """export_every writes exports/step-N in the official layout; with an EMA the
    exports hold the EMA weights: ema_N = d * ema_(N-1) + (1 - d) * w_N, from the
    initial weights (checked against the raw weights of two stopped runs)."""
    import torch
    from safetensors.torch import load_file

    from openbagel.train.run import train

    quiet = dict(progress=False, echo=lambda s: None)
    optim = {"max_steps": 4, "lr": 1e-3, "ema_decay": 0.5}
    cfg = _config(tmp_path, tiny_dir, optim=optim, export_every=2)
    train(cfg, tmp_path / "ema", **quiet)
    exports = sorted(p.name for p in (tmp_path / "ema" / "exports").iterdir())
    assert exports == ["step-000002", "step-000004"]
    final = load_file(tmp_path / "ema" / "checkpoint" / "ema.safetensors")
    last = load_file(tmp_path / "ema" / "exports" / "step-000004" / "ema.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)
    BagelPipeline.from_pretrained(tmp_path / "ema" / "exports" / "step-000002")  # loads strictly

    # the raw weights after steps 0..4 (same run without EMA, stopped at each step)
    raw = []
    plain = _config(tmp_path, tiny_dir, optim={"max_steps": 4, "lr": 1e-3})
    for n in range(0, 5):
        out = tmp_path / f"raw{n}"
        if n == 0:
            train(plain, out, max_steps=1, stop_at=0, **quiet)
        else:
            train(plain, out, stop_at=n, **quiet)
        raw.append(load_file(out / "checkpoint" / "ema.safetensors"))
    ema = dict(raw[0])
    for w in raw[1:]:
        ema = {k: 0.5 * ema[k] + 0.5 * w[k] for k in ema}
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(final[key], raw[4][key])  # not the raw weights
    for k in final:
        torch.testing.assert_close(final[k], ema[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["shapes.yaml", "shapes-defaults.yaml"])
def test_shipped_recipes_parse(name):
    """The embedded model's recipes (configs/) stay valid as the trainer changes."""
    from pathlib import Path

    from openbagel.train.run import _data_sources, load_run_config

    path = Path(__file__).parents[1] / "configs" / name
    cfg = load_run_config(path)
    (source,) = _data_sources(cfg, path.parent)
    assert source.kind == "shapes"
    assert source.world.unspecified == ("default" if name == "shapes-defaults.yaml" else "random")


# A run killed by SIGKILL in the middle of a real write: the child process
# patches the writer so that it kills itself after the first item of the N-th
# state file (torch.distributed.checkpoint, one data file per save on one
# process), or as the N-th checkpoint file of an export starts.
_KILLED_RUN = """
import os, signal, sys
import safetensors.torch
import torch.distributed.checkpoint.filesystem as fs
from openbagel.train.run import train

config, output, where, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real_write_item, real_save_file = fs._write_item, safetensors.torch.save_file
streams, exports = [], []

def write_item(transforms, stream, *args, **kwargs):
    result = real_write_item(transforms, stream, *args, **kwargs)
    if stream not in streams:
        streams.append(stream)
    if where == "save" and len(streams) == n:
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return result

def save_file(tensors, filename, *args, **kwargs):
    exports.append(filename)
    if where == "export" and len(exports) == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_file(tensors, filename, *args, **kwargs)

fs._write_item, safetensors.torch.save_file = write_item, save_file
train(config, output, progress=False)
"""


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_dir):
    """4 steps, saving the state and exporting every 2 steps, never interrupted."""
    from openbagel.train.run import train

    tmp = tmp_path_factory.mktemp("straight")
    cfg = _config(tmp, tiny_dir, optim={"max_steps": 4, "lr": 1e-3, "warmup_steps": 2}, save_every=2, export_every=2)
    train(cfg, tmp / "run", progress=False, echo=lambda s: None)
    return cfg, tmp / "run"


@pytest.mark.parametrize(
    "where,n,resumed_at",
    [
        ("save", 2, 2),  # killed while saving step 4's state: step 2's save is used
        ("save", 1, 0),  # killed during the first save: --resume starts at step 0
        ("export", 1, 0),  # killed as step 2's export began (a 0-byte temporary file)
        ("export", 5, 4),  # killed writing the final checkpoint/ (exports: 2 files each at steps 2, 4)
    ],
)
def test_resume_after_a_kill_during_a_write(tmp_path, straight_run, where, n, resumed_at):
    """kill -9 in the middle of a state save or an export, then --resume: the
    leftovers are removed and the run ends bitwise equal to one never
    interrupted (weights, exports, log)."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from openbagel.train.run import train

    cfg, straight = straight_run
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the same arithmetic as this process
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(cfg), str(out), where, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    if where == "save":  # a state file half written, its save never completed
        partial = out / "state" / f"step-{2 * n:06d}"
        sizes = [f.stat().st_size for f in partial.glob("*.distcp")]
        assert not (partial / ".metadata").exists() and len(sizes) == 1 and sizes[0] > 0
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out)])  # a fresh start names the way out
    assert r.exit_code == 2 and "continue it with --resume" in r.output
    messages = []
    result = train(cfg, out, resume=True, progress=False, echo=messages.append)
    assert any(f"step {resumed_at}" in m for m in messages), messages
    assert any(m.startswith("removed ") for m in messages), messages
    assert result.steps == 4
    assert sorted(p.name for p in (out / "state").iterdir()) == ["latest", "step-000004"]
    for name in ("checkpoint", "exports/step-000002", "exports/step-000004"):
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(p.name for p in (straight / name).iterdir())
        a, b = load_file(straight / name / "ema.safetensors"), load_file(out / name / "ema.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bad_paths_are_refused_before_the_model_is_built(tmp_path, tiny_dir, monkeypatch):
    """Every path of a run (output, config, data, assets) is checked first: one
    line naming the problem, no traceback, no model built."""
    import openbagel.train.run as run

    monkeypatch.setattr(run, "_build_model", lambda *a: pytest.fail("the model was built"))
    (tmp_path / "afile").write_text("")
    long = "x" * 300
    assets = {"init": "scratch", "preset": "tiny-golden"}
    cases = [
        ({}, tmp_path / "afile", "--output", "is a file; give a folder for the run"),
        ({}, "", "--output '.' is empty or names no folder", "give a folder for the run"),  # was the cwd
        ({}, tmp_path / "afile" / "run", "--output", "cannot create the run folder"),
        ({}, tmp_path / long, "--output", "File name too long"),
        ({"data": [{"kind": "llava_jsonl", "path": long}]}, None, "data[0]", "File name too long"),
        ({"model": {**assets, "assets": long}}, None, "assets folder", "File name too long"),
        ({"model": {**assets, "assets": "afile"}}, None, "assets folder", "is a file"),
        ({"model": {"init": long}}, None, "bad checkpoint path", "File name too long"),
    ]
    for overrides, output, where, message in cases:
        cfg = _config(tmp_path, tiny_dir, **overrides)
        r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "o" if output is None else output)])
        assert r.exit_code == 2 and where in r.output and message in r.output, (overrides, output, r.output)
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "is a folder; give the YAML file" in r.output


def test_resume_from_a_state_saved_in_the_single_folder_layout(tmp_path, straight_run):
    """A run saved by an earlier version (the DCP files directly in state/) resumes
    exactly, and its next save replaces that layout."""
    import torch
    from safetensors.torch import load_file

    from openbagel.train.run import train

    cfg, straight = straight_run
    out = tmp_path / "old"
    quiet = dict(progress=False, echo=lambda s: None)
    train(cfg, out, stop_at=2, **quiet)
    state = out / "state"
    for f in (state / "step-000002").iterdir():
        f.rename(state / f.name)
    (state / "step-000002").rmdir()
    (state / "latest").unlink()
    train(cfg, out, resume=True, **quiet)
    assert sorted(p.name for p in state.iterdir()) == ["latest", "step-000004"]
    a, b = load_file(straight / "checkpoint" / "ema.safetensors"), load_file(out / "checkpoint" / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_damaged_save_names_the_way_out(tmp_path, straight_run):
    """A complete save damaged afterwards (a disk error): one line naming the save and what to do."""
    import shutil

    cfg, straight = straight_run
    out = tmp_path / "damaged"
    shutil.copytree(straight, out)
    (data,) = (out / "state" / "step-000004").glob("*.distcp")
    data.write_bytes(data.read_bytes()[:1000])
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "--resume"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "step-000004 is damaged" in r.output and "and --resume again to restart at step 0" in r.output
