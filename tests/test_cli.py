"""The command line, end to end on the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from openbagel.cli import app

runner = CliRunner()


@pytest.fixture()
def model_args(tiny_dir):
    return ["--model", str(tiny_dir)]


def test_help_tells_the_truth():
    import typer.main

    generate = typer.main.get_command(app).commands["generate"]
    opts = {name: p for p in generate.params for name in p.opts}
    assert "STEPS-1" in opts["--steps"].help  # num_timesteps counts schedule points
    assert opts["--cfg-text"] is opts["--guidance-scale"] and opts["--cfg-img"] is opts["--image-guidance-scale"]
    assert all(p.help for p in generate.params if p.param_type_name == "option")
    out = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output
    assert "--guidance-scale" in out and "--size" in out
    for cmd in ("edit", "understand", "chat"):
        assert runner.invoke(app, [cmd, "--help"]).exit_code == 0


def test_generate_edit_understand(tmp_path, model_args):
    out = tmp_path / "cube.png"
    r = runner.invoke(app, ["generate", "a red cube", "-o", str(out), "--seed", "0", "--steps", "3", *model_args])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (64, 64)
    again = tmp_path / "again.png"
    runner.invoke(app, ["generate", "a red cube", "-o", str(again), "--seed", "0", "--steps", "3", *model_args])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))

    edited = tmp_path / "blue.jpg"
    r = runner.invoke(
        app, ["edit", str(out), "make it blue", "-o", str(edited), "--steps", "3", "--cfg-img", "1.5", *model_args]
    )
    assert r.exit_code == 0, r.output
    assert Image.open(edited).format == "JPEG"

    r = runner.invoke(app, ["understand", str(out), "what is it?", "--max-new-tokens", "4", *model_args])
    assert r.exit_code == 0, r.output
    assert r.output.endswith("\n")

    r = runner.invoke(
        app, ["generate", "x", "-o", str(tmp_path / "w.png"), "--size", "128x64", "--steps", "2", *model_args]
    )
    assert r.exit_code == 0 and Image.open(tmp_path / "w.png").size == (128, 64)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--size", "70x64"], "width 70 is not a multiple of 16; the nearest valid width is 64"),
        (["--size", "2048x64"], "exceeds this model's limit of 1024 pixels"),
        (["--size", "big"], "--size must look like WIDTHxHEIGHT"),
        (["--steps", "1"], "num_timesteps must be at least 2"),
        (["--renorm", "nope"], "cfg_renorm_type must be one of"),
        (["--cfg-interval", "0.4"], "--cfg-interval must look like LO,HI"),
        (["--dtype", "int8"], "dtype 'int8' is not supported"),
        (["--device", "meta"], "device type 'meta' is not supported"),
        (["--seed", "18446744073709551616"], "seed must be an integer"),
        (["--cfg-text", "inf"], "guidance_scale must be a finite number"),
        (["--renorm-min", "1.5"], "cfg_renorm_min must be in [0, 1]"),
        (["--size", "-16x64"], "width -16 is too small"),
    ],
)
def test_generate_bad_input(tmp_path, model_args, args, message):
    out = tmp_path / "o.png"
    r = runner.invoke(app, ["generate", "x", "-o", str(out), *model_args, *args])
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_settings_checked_before_weights_load(tmp_path, tiny_dir):
    # a broken weights file is never read when a setting is wrong
    ckpt = tmp_path / "ckpt"
    import shutil

    shutil.copytree(tiny_dir, ckpt)
    (ckpt / "ema.safetensors").write_text("broken")
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "o.png"), "--steps", "0", "--model", str(ckpt)])
    assert r.exit_code == 2 and "num_timesteps must be at least 2" in r.output


@pytest.mark.parametrize("ext", [".psd", ".xbm", ".h5", ""])
def test_unwritable_formats_refused(tmp_path, model_args, ext):
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / f"o{ext}"), *model_args])
    assert r.exit_code == 2 and "cannot write images with extension" in r.output


def test_output_path_is_a_folder(tmp_path, model_args):
    (tmp_path / "d.png").mkdir()
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "d.png"), *model_args])
    assert r.exit_code == 2 and "is a folder" in r.output


def test_understand_think(tmp_path, model_args):
    img = tmp_path / "in.png"
    Image.new("RGB", (64, 48)).save(img)
    r = runner.invoke(app, ["understand", str(img), "why?", "--think", "--max-new-tokens", "4", *model_args])
    assert r.exit_code == 0, r.output


def test_output_path_checked_first(tmp_path, model_args):
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "o.xyz"), *model_args])
    assert r.exit_code == 2 and "cannot write images with extension '.xyz'" in r.output
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "no" / "o.png"), *model_args])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_bad_model_and_image(tmp_path, model_args):
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "o.png"), "--model", str(tmp_path / "none")])
    assert r.exit_code == 2 and "does not exist" in r.output
    txt = tmp_path / "a.txt"
    txt.write_text("hi")
    r = runner.invoke(app, ["edit", str(txt), "x", "-o", str(tmp_path / "o.png"), *model_args])
    assert r.exit_code == 2 and "not an image file" in r.output
    r = runner.invoke(app, ["understand", str(tmp_path / "missing.png"), "x", *model_args])
    assert r.exit_code == 2 and "image file not found" in r.output


def test_chat_session(tmp_path, model_args):
    img = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (0, 0, 255)).save(img)
    gen = tmp_path / "gen.png"
    gen2 = tmp_path / "gen2.png"
    script = (
        f"hello\n/image {img}\n/image {tmp_path / 'missing.png'}\n/generate -o {gen}\n/bogus\ndescribe\n"
        f"/generate {tmp_path / 'bad.xyz'}\n/generate {tmp_path / 'nodir' / 'x.png'}\n/generate {gen2}\n/quit\n"
    )
    r = runner.invoke(app, ["chat", "--max-new-tokens", "3", "--steps", "2", *model_args], input=script)
    assert r.exit_code == 0, r.output
    assert "(image added, 80x64)" in r.output
    assert "image file not found" in r.output  # reported, the chat goes on
    assert f"(image written to {gen})" in r.output and Image.open(gen).size == (64, 64)
    assert "unknown command /bogus" in r.output
    assert r.output.count("bagel> ") == 2
    # a bad output path is refused before compute and the chat goes on
    assert "cannot write images with extension '.xyz'" in r.output and "does not exist" in r.output
    assert Image.open(gen2).size == (64, 64) and not (tmp_path / "bad.xyz").exists()


def test_chat_bad_size_refused_at_start(model_args):
    r = runner.invoke(app, ["chat", "--size", "70x64", *model_args], input="hello\n")
    assert r.exit_code == 2 and "nearest valid width is 64" in r.output
