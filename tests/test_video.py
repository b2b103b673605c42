"""Clips in and out (openbagel.video), next-frame prediction and style presets,
on the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from openbagel.cli import app
from openbagel.errors import InvalidInputError
from openbagel.pipeline import STYLE_PRESETS, style_instruction
from openbagel.video import Clip, read_clip, write_clip

runner = CliRunner()


def _frames(n=3, size=(64, 48)):
    """Frames with a white square moving right on black: each differs from the last."""
    out = []
    for i in range(n):
        a = np.zeros((size[1], size[0], 3), np.uint8)
        a[16:32, 8 * i : 8 * i + 16] = 255
        out.append(Image.fromarray(a))
    return out


@pytest.mark.parametrize("ext", [".gif", ".mp4", ".webm"])
def test_clip_files_round_trip(tmp_path, ext):
    frames = _frames(4)
    path = tmp_path / f"clip{ext}"
    assert write_clip(Clip(frames, fps=5.0), path) == [path]
    clip = read_clip(path)
    assert len(clip.frames) == 4 and clip.frames[0].size == (64, 48)
    assert clip.fps == pytest.approx(5.0, rel=0.01)
    tolerance = 0 if ext == ".gif" else 40  # lossy video codecs
    for got, want in zip(clip.frames, frames):
        err = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
        assert np.percentile(err, 99) <= tolerance
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_odd_sizes_padded_in_video(tmp_path):
    frames = _frames(2, size=(33, 17))
    write_clip(Clip(frames), tmp_path / "odd.mp4")
    assert read_clip(tmp_path / "odd.mp4").frames[0].size == (34, 18)


def test_image_list_and_folder_output(tmp_path):
    paths = []
    for i, f in enumerate(_frames(3)):
        paths.append(tmp_path / f"in{i}.png")
        f.save(paths[-1])
    clip = read_clip(paths)
    assert len(clip.frames) == 3 and clip.fps == 4.0
    out = tmp_path / "out"
    out.mkdir()
    written = write_clip(clip, out)
    assert [p.name for p in written] == ["frame-001.png", "frame-002.png", "frame-003.png"]
    assert np.array_equal(np.asarray(Image.open(written[2])), np.asarray(clip.frames[2]))


def test_bad_clips(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        read_clip(tmp_path / "missing.gif")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InvalidInputError, match="not a video file"):
        read_clip(tmp_path / "bad.mp4")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    _frames(1)[0].save(a)
    _frames(1, size=(32, 32))[0].save(b)
    with pytest.raises(InvalidInputError, match="frame 2 is 32x32 but frame 1 is 64x48"):
        read_clip([a, b])
    with pytest.raises(InvalidInputError, match="no clip given"):
        read_clip([])
    write_clip(Clip(_frames(2)), tmp_path / "c.gif")
    with pytest.raises(InvalidInputError, match="a clip file must come alone"):
        read_clip([tmp_path / "c.gif", tmp_path / "c.gif"])
    with pytest.raises(InvalidInputError, match=r"use a \.gif, \.mp4 or \.webm"):
        write_clip(Clip(_frames(1)), tmp_path / "out.txt")
    with pytest.raises(InvalidInputError, match="does not exist"):
        write_clip(Clip(_frames(1)), tmp_path / "nope" / "out.gif")


def test_predict_frames_is_autoregressive(pipe):
    """Each predicted frame joins the context: two frames at once equal one
    frame, then one more from the clip plus that frame (same random stream)."""
    frames = _frames(2)
    settings = dict(num_timesteps=3)
    both = pipe.predict_frames(frames, 2, generator=torch.Generator().manual_seed(0), **settings).images
    g = torch.Generator().manual_seed(0)
    first = pipe.predict_frames(frames, 1, generator=g, **settings).image
    second = pipe.predict_frames([*frames, first], 1, generator=g, **settings).image
    assert len(both) == 2 and both[0].size == (80, 64)  # the tiny model's VAE-path resize
    assert np.array_equal(np.asarray(both[0]), np.asarray(first))
    assert np.array_equal(np.asarray(both[1]), np.asarray(second))
    # a context window of the last frame only sees less: another second frame
    windowed = pipe.predict_frames(frames, 2, context_frames=1, seed=0, **settings).images
    assert np.array_equal(
        np.asarray(windowed[0]), np.asarray(pipe.predict_frames(frames[-1:], 1, seed=0, **settings).image)
    )
    assert not np.array_equal(np.asarray(windowed[1]), np.asarray(both[1]))


@pytest.mark.parametrize("kwargs", [dict(num_frames=0), dict(context_frames=0), dict(num_frames=True)])
def test_predict_frames_bad_counts(pipe, kwargs):
    with pytest.raises(InvalidInputError, match="must be a whole number >= 1"):
        pipe.predict_frames(_frames(1), **kwargs)


def test_predict_frames_refuses_mixed_sizes(pipe):
    """As the CLI does (found by a helper: the API used to return a frame at the last size)."""
    with pytest.raises(InvalidInputError, match="frame 2 is 32x32 but frame 1 is 64x48"):
        pipe.predict_frames([_frames(1)[0], _frames(1, size=(32, 32))[0]])


def test_style_presets(pipe):
    assert style_instruction(None, "pixel") == STYLE_PRESETS["pixel"] == "make it pixel art"
    for prompt, style, message in [
        (None, None, r"needs an instruction or a style preset \(outline, pixel, invert\)"),
        ("x", "pixel", "not both"),
        (None, "oil", "unknown style 'oil'"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            style_instruction(prompt, style)
    img = _frames(1)[0]
    a = pipe.edit(img, style="invert", seed=1, num_timesteps=3).image
    b = pipe.edit(img, "invert the colours", seed=1, num_timesteps=3).image
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_frames_cli(tmp_path, tiny_dir):
    clip = tmp_path / "in.gif"
    write_clip(Clip(_frames(3), fps=2.0), clip)
    out = tmp_path / "next.gif"
    args = ["--model", str(tiny_dir), "--steps", "3", "--seed", "0"]
    r = runner.invoke(app, ["frames", str(clip), "-n", "2", "-o", str(out), *args])
    assert r.exit_code == 0, r.output
    got = read_clip(out)
    assert len(got.frames) == 2 and got.fps == pytest.approx(2.0) and "wrote 2 frame(s)" in r.output
    r = runner.invoke(app, ["frames", str(clip), "-n", "1", "-o", str(out), "--include-input", "--fps", "5", *args])
    assert r.exit_code == 0, r.output
    got = read_clip(out)
    assert len(got.frames) == 4 and got.fps == pytest.approx(5.0)

    for bad, message in [
        (["-n", "0", "-o", str(out)], "--num-frames must be at least 1"),
        (["-o", str(tmp_path / "x.txt")], "use a .gif"),
        (["-o", str(out), "--context-frames", "0"], "--context-frames must be at least 1"),
    ]:
        r = runner.invoke(app, ["frames", str(clip), *bad, *args])
        assert r.exit_code == 2 and message in r.output, r.output


def test_edit_cli_style(tmp_path, tiny_dir):
    img = tmp_path / "in.png"
    _frames(1)[0].save(img)
    args = ["--model", str(tiny_dir), "--steps", "3", "--seed", "0"]
    r = runner.invoke(app, ["edit", str(img), "--style", "outline", "-o", str(tmp_path / "o.png"), *args])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["edit", str(img), "-o", str(tmp_path / "o.png"), *args])
    assert r.exit_code == 2 and "needs an instruction" in r.output
    r = runner.invoke(app, ["edit", str(img), "--style", "oil", "-o", str(tmp_path / "o.png"), *args])
    assert r.exit_code == 2 and "choose from outline, pixel, invert" in r.output
