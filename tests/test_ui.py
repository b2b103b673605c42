"""The web UI: helpers in process, and ``openbagel ui`` driven in headless
Chromium by Playwright (the system's ``chromium``; no browser download).
Screenshots of every tab go to ``test-output/ui/`` (or ``$OPENBAGEL_TEST_OUTPUT/ui``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from openbagel.ui import SIZE_PRESETS, ModelHandle, preset_size, size_choices
from tests.conftest import live_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = Path(os.environ.get("OPENBAGEL_TEST_OUTPUT", Path(__file__).resolve().parents[1] / "test-output")) / "ui"


def test_size_choices_are_the_models_sizes():
    from openbagel import preset

    assert size_choices(preset("shapes").supported_sizes, 64) == ["1:1"]  # 64x64 only; 16:9 would be 64x32
    assert size_choices(preset("7b-mot").supported_sizes, 1024) == list(SIZE_PRESETS)


def test_preset_sizes():
    assert preset_size("1:1", 1024) == (1024, 1024)
    assert preset_size("4:3", 1024) == (1024, 768)
    assert preset_size("3:4", 1024) == (768, 1024)
    assert preset_size("16:9", 1024) == (1024, 576)
    assert preset_size("9:16", 64) == (32, 64)
    assert all(w % 16 == 0 and h % 16 == 0 for r in SIZE_PRESETS for w, h in [preset_size(r, 64)])


def test_messages_name_uploads_without_their_folder():
    from openbagel.errors import InvalidInputError
    from openbagel.ui import _friendly

    @_friendly
    def read():
        raise InvalidInputError("/tmp/gradio/0123456789abcdef0123/clip.gif: not a GIF Pillow can read")

    import gradio as gr

    with pytest.raises(gr.Error) as e:
        read()
    assert e.value.message == "clip.gif: not a GIF Pillow can read"


def test_model_handle_loads_once_and_reports_failures():
    calls = []
    h = ModelHandle(lambda: calls.append(1) or "pipe")
    assert h.get() == "pipe" and h.get() == "pipe" and calls == [1]

    import gradio as gr

    def broken():
        raise OSError("disk gone")

    with pytest.raises(gr.Error, match="disk gone"):
        ModelHandle(broken).get()


def test_building_the_ui_loads_no_weights(monkeypatch):
    import importlib

    import openbagel.ui
    from openbagel.pipeline import BagelPipeline

    calls = []
    monkeypatch.setattr(BagelPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append(a)))
    ui = importlib.reload(openbagel.ui).build_ui()
    assert calls == [] and ui is not None  # the weights load only when the app starts


@pytest.fixture(scope="module")
def ui_url(tmp_path_factory):
    with live_cli(["ui"], "/", tmp_path_factory.mktemp("ui") / "ui.log") as (base, _):
        yield base + "/"


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system's chromium (apt install chromium)")
def test_ui_in_a_browser(ui_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(ui_url)
        # Generate: an image appears
        page.locator("#generate-prompt textarea").fill("a red circle above a blue square")
        page.locator("#generate-run").click()
        page.locator("#generate-image img").wait_for(timeout=60_000)
        assert page.locator("#generate-info").inner_text(timeout=10_000).startswith("seed ")
        page.screenshot(path=str(OUTPUT / "generate.png"))
        # Understand: an answer appears
        page.get_by_role("tab", name="Understand").click()
        page.locator("#understand-question textarea").fill("What shapes are there?")
        page.locator("#understand-run").click()
        answer = page.locator("#understand-answer textarea")
        page.wait_for_function("el => el.value.length > 0", arg=answer.element_handle(), timeout=60_000)
        assert answer.input_value()
        page.screenshot(path=str(OUTPUT / "understand.png"))
        for tab in ("Edit", "Chat", "Frames"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(300)
            page.screenshot(path=str(OUTPUT / f"{tab.lower()}.png"))
        browser.close()
    assert sorted(f.name for f in OUTPUT.glob("*.png")) == [
        "chat.png",
        "edit.png",
        "frames.png",
        "generate.png",
        "understand.png",
    ]
