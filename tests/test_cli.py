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


# --- output and input paths: one line naming the problem, before any work ------------------------------

LONG = "a" * 300  # longer than any file system's name limit (255 bytes on Linux)


def _paths(tmp_path):
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    (tmp_path / "file.txt").write_text("x")
    return tmp_path / "folder", tmp_path / "in.png", tmp_path / "file.txt"


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "x", "-o", "{t}/" + LONG + ".png"], "is too long for this file system (304 bytes; at most"),
        # fits the 255-byte limit, but its temporary name beside it would not
        (["generate", "x", "-o", "{t}/" + "b" * 245 + ".png"], "is too long for this file system (249 bytes; at most"),
        (["generate", "x", "-o", "{file}/o.png"], "output folder '{file}' is a file, not a folder"),
        (
            ["generate", "x", "-o", "{folder}"],
            "output path '{folder}' is a folder; give a file name",
        ),  # not "extension"
        (["edit", "{folder}", "x", "-o", "{t}/o.png"], "image file '{folder}' is a folder; give a file"),
        (["edit", "{t}/" + LONG + ".png", "x", "-o", "{t}/o.png"], "File name too long; check the path"),
        (["understand", "{folder}", "why?"], "image file '{folder}' is a folder; give a file"),
        (["understand", "{t}/nope.png", "why?"], "image file not found: '{t}/nope.png'; check the path"),
        (["understand", "/dev/null", "why?"], "image file '/dev/null' is not a regular file; give a file"),
        (["generate", "x", "-o", "{t}/o.png", "--adapter", "{t}/" + LONG], "bad --adapter folder path"),
        (["generate", "x", "-o", "{t}/o.png", "--adapter", "{file}"], "--adapter folder '{file}' is a file"),
        (["generate", "x", "-o", "{t}/o.png", "--adapter", "{t}/none"], "--adapter folder not found"),
        (["frames", "{t}/" + LONG + ".gif", "-o", "{t}/o.gif"], "bad clip file path"),
        (["frames", "{image}", "-o", "{t}/" + LONG + ".gif"], "is too long for this file system"),
        (["eval", "shapes", "--ground-truth", "--items", "1", "--json", "{t}/" + LONG + ".json"], "too long"),
        (["eval", "shapes", "--ground-truth", "--items", "1", "--json", "{folder}"], "is a folder; give a file"),
        (["bench", "--config", "tiny", "--json", "{t}/" + LONG + ".json"], "--json name"),
        (["data", "shapes", "{t}/new/" + LONG], "output name 'aaaa"),
        (["quantize", "--quant", "llm=int8", "-o", "{t}/" + LONG], "--output name 'aaaa"),
        (["quantize", "--quant", "llm=int8", "-o", "{file}/q"], "is a file, not a folder"),
    ],
)
def test_bad_paths_are_one_line_errors(tmp_path, tiny_dir, args, message):
    folder, image, file = _paths(tmp_path)
    names = dict(t=tmp_path, folder=folder, image=image, file=file)
    args = [a.format(**names) for a in args]
    model = ["--model", str(tiny_dir)] if args[0] in ("generate", "edit", "understand", "frames") else []
    before = sorted(tmp_path.rglob("*"))
    r = runner.invoke(app, [*args, *model])
    assert r.exit_code == 2, r.output
    assert message.format(**names) in r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error: ")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_unreadable_input_and_unwritable_folder(tmp_path, tiny_dir, monkeypatch):
    import os

    _, image, _ = _paths(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not mode & os.R_OK and real_access(p, mode))
    r = runner.invoke(app, ["understand", str(image), "why?", "--model", str(tiny_dir)])
    assert r.exit_code == 2 and f"cannot read image file '{image}' (permission denied)" in r.output
    monkeypatch.setattr(os, "access", lambda p, mode: not mode & os.W_OK and real_access(p, mode))
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "o.png"), "--model", str(tiny_dir)])
    assert r.exit_code == 2 and f"output folder '{tmp_path}' is not writable; choose another folder" in r.output


def test_missing_parents_of_a_new_folder_are_still_created(tmp_path):
    r = runner.invoke(app, ["data", "shapes", str(tmp_path / "new" / "data"), "--count", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "new" / "data" / "chat.jsonl").is_file()


# --- leftovers of killed runs ------------------------------------------------------------------------------


def _umask() -> int:
    import os

    umask = os.umask(0)
    os.umask(umask)
    return umask


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)  # that process has exited


def test_generate_removes_its_dead_temp_files_only(tmp_path, model_args):
    import os

    dead, live = _dead_pid(), os.getppid()  # the parent of this test process is alive
    stale = [tmp_path / f".o.png.{dead}.k3x_9abc.png"]  # a killed generate -o o.png
    kept = [
        tmp_path / f".o.png.{live}.k3x_9abc.png",  # a write in progress
        tmp_path / f".other.png.{dead}.k3x_9abc.png",  # another output's
        tmp_path / f".o.png.{dead}.k3x_9abc.png.bak",  # not our pattern
        tmp_path / f".o.png.{dead}.k3x.png",
        tmp_path / f"o.png.{dead}.k3x_9abc.png",
    ]
    for p in stale + kept:
        p.write_bytes(b"")
    look_alike_folder = tmp_path / f".o.png.{dead}.abcdefgh.png"
    look_alike_folder.mkdir()
    link = tmp_path / f".o.png.{dead}.zzzzzzzz.png"
    link.symlink_to(tmp_path / "other.png")
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "o.png"), "--steps", "2", *model_args])
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and look_alike_folder.is_dir() and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "o.png",
        f"o.png.{dead}.k3x_9abc.png",
    ]


def test_quantize_removes_its_dead_partial_folders_only(tmp_path):
    import os

    pytest.importorskip("torchao")
    dead, live = _dead_pid(), os.getppid()  # the parent of this test process is alive
    stale = tmp_path / f".q.partial-{dead}"  # a killed quantize -o q
    kept = [tmp_path / f".q.partial-{live}", tmp_path / f".q2.partial-{dead}", tmp_path / f".q.partial-{dead}x"]
    for folder in [stale, *kept]:
        folder.mkdir()
        (folder / "model.quantized.safetensors").write_bytes(b"half")
    as_file = tmp_path / f".q.partial-{dead + 1 if dead + 1 != live else dead + 2}"
    as_file.write_text("not a folder of ours")
    r = runner.invoke(app, ["quantize", "--quant", "llm=int8", "-o", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q" / "quantization.json").is_file() and not stale.exists()
    # the weights are as readable as the other files (safetensors wrote them 0o600)
    mode = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "q").iterdir()}
    assert mode["model.quantized.safetensors"] == mode["quantization.json"] == 0o666 & ~_umask()
    assert all((f / "model.quantized.safetensors").read_bytes() == b"half" for f in kept) and as_file.is_file()


# --- the CLI keeps up with the API: -n, several input images, plain flags ----------------------------------


def test_generate_n_writes_numbered_files_with_consecutive_seeds(tmp_path, model_args):
    out = tmp_path / "c.png"
    r = runner.invoke(
        app, ["generate", "a red circle", "-n", "3", "--seed", "5", "--steps", "3", "-o", str(out), *model_args]
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c-0.png", "c-1.png", "c-2.png"]
    single = tmp_path / "single.png"
    r = runner.invoke(app, ["generate", "a red circle", "--seed", "6", "--steps", "3", "-o", str(single), *model_args])
    assert r.exit_code == 0, r.output
    pixels = [np.asarray(Image.open(tmp_path / f"c-{k}.png")).astype(int) for k in range(3)]
    # image 1 of the batch is the seed-6 image: a batch differs from a single run by float rounding at most
    assert np.abs(pixels[1] - np.asarray(Image.open(single)).astype(int)).max() <= 2
    assert np.abs(pixels[0] - pixels[1]).max() > 10  # another seed, another image
    r = runner.invoke(app, ["generate", "x", "-n", "12", "--steps", "2", "-o", str(tmp_path / "m.png"), *model_args])
    assert r.exit_code == 0 and (tmp_path / "m-00.png").is_file() and (tmp_path / "m-11.png").is_file()
    r = runner.invoke(app, ["generate", "x", "-n", "0", "-o", str(tmp_path / "z.png"), *model_args])
    assert r.exit_code == 2 and "-n/--num-images must be from 1 to 64, got 0" in r.output


def test_generate_without_a_seed_prints_the_seeds_it_drew(tmp_path, model_args):
    """Without --seed the images could not be made again (their seeds were never shown)."""
    import re

    r = runner.invoke(
        app, ["generate", "a red circle", "-n", "2", "--steps", "3", "-o", str(tmp_path / "r.png"), *model_args]
    )
    assert r.exit_code == 0, r.output
    seeds = [int(s) for s in re.findall(r"wrote \S+ \(\d+x\d+, seed (\d+)\)", r.output)]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1
    again = tmp_path / "again.png"
    r = runner.invoke(
        app, ["generate", "a red circle", "--seed", str(seeds[1]), "--steps", "3", "-o", str(again), *model_args]
    )
    assert r.exit_code == 0 and f"seed {seeds[1]})" in r.output
    # image 1 of the batch, made again alone: equal up to float rounding (a batch vs a single run)
    batch, single = (np.asarray(Image.open(p)).astype(int) for p in (tmp_path / "r-1.png", again))
    assert np.abs(batch - single).max() <= 2


def test_edit_and_understand_take_several_images(tmp_path, model_args, pipe):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(first)
    Image.new("RGB", (64, 64), (0, 0, 255)).save(second)
    r = runner.invoke(app, ["understand", str(first), "what colour?", "--image", str(second), *model_args])
    assert r.exit_code == 0, r.output
    assert r.output == pipe.understand([first, second], "what colour?").text + "\n"
    out = tmp_path / "e.png"
    args = ["edit", str(first), "make it blue", "--image", str(second), "--seed", "0", "--steps", "3", "-o", str(out)]
    r = runner.invoke(app, [*args, *model_args])
    assert r.exit_code == 0, r.output
    expected = pipe.edit(first, "make it blue", images=[second], seed=0, num_timesteps=3).image
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))  # the same computation
    r = runner.invoke(app, ["understand", str(first), "q", "--image", str(tmp_path / "nope.png"), *model_args])
    assert r.exit_code == 2 and f"image file not found: '{tmp_path / 'nope.png'}'" in r.output


def _all_commands(group, path=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _all_commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_boolean_flags_take_no_value_in_help():
    import typer.main

    flags = 0
    for path, command in _all_commands(typer.main.get_command(app)):
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"}).output
        for param in command.params:
            if getattr(param, "is_flag", False):
                flags += 1
                line = next(line for line in out.splitlines() if f" {param.opts[0]} " in line)
                assert "<bool>" not in line, (path, line)  # --think, not --think <bool>
    assert flags >= 15


def test_readme_walkthrough_outputs_are_git_ignored():
    import re
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (root / "README.md").read_text()
    outputs = set(re.findall(r"^\.venv/bin/openbagel .*-o (\S+)$", readme, re.M))
    outputs |= set(re.findall(r"\.save\('([^']+)'", readme))
    assert {"shapes.png", "next.gif", "clip.gif", "runs/tiny"} <= outputs
    ignored = subprocess.run(["git", "check-ignore", *sorted(outputs)], cwd=root, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(outputs)
