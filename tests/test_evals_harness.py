"""Evaluation harnesses against openbagel: VLMEvalKit's API mode (its OpenAI wrapper's request shape)."""

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openbagel import BagelPipeline
from openbagel.serve import ServeSettings, create_app
from openbagel.shapes import world


@pytest.fixture(scope="module")
def pipe():
    return BagelPipeline.from_pretrained()


def test_vlmevalkit_api_mode_request_is_answered(pipe):
    """The payload VLMEvalKit's `GPT4V` wrapper posts (vlmeval/api/gpt.py): JPEG data URLs with `detail`,
    temperature 0, max_tokens 2048, no `n` for a non-OpenAI base, a Bearer key, images then the question."""
    scene = world.Scene((world.Obj("circle", "red", "large", (0, 0)),), "white")
    image = world.render(scene)
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    question = "What colour is the circle?"
    payload = {
        "model": "openbagel-shapes",  # the served name (GET /v1/models), as in the config file
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": 2048,
    }
    app = create_app(ServeSettings(), pipe=pipe)
    with TestClient(app) as client:
        assert app.state.engine.wait_loaded(30)
        r = client.post("/v1/chat/completions", json=payload, headers={"Authorization": "Bearer EMPTY"})
    assert r.status_code == 200, r.text
    jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert r.json()["choices"][0]["message"]["content"] == pipe.understand(jpeg, question).text
