"""The HTTP server in process (FastAPI's TestClient) on the embedded model:
routes, OpenAI shapes, request isolation, limits and errors; the engine's
queue and cancellation with stand-in jobs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import time
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openbagel import BagelPipeline, Chat
from openbagel.pipeline import ReasoningSplitter, split_reasoning
from openbagel.serve import Limits, ServeSettings, create_app
from openbagel.serve.engine import Cancelled, Engine, Job, QueueFull
from openbagel.serve.metrics import Metrics
from openbagel.shapes import world
from tests.close import assert_images_close
from tests.test_images import bad_exif_jpeg

FAST = {"num_inference_steps": 4}


@pytest.fixture(scope="module")
def shapes_pipe():
    return BagelPipeline.from_pretrained()


def _client(pipe, **settings) -> TestClient:
    app = create_app(ServeSettings(**settings), pipe=pipe)
    client = TestClient(app)
    client.__enter__()
    assert app.state.engine.wait_loaded(30)
    return client


@pytest.fixture(scope="module")
def client(shapes_pipe):
    c = _client(shapes_pipe)
    yield c
    c.__exit__(None, None, None)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def scene_image(size: int = 64) -> Image.Image:
    obj = world.Obj("circle", "red", "large", (1, 1))
    return world.render(world.Scene((obj,), "white"), size)


def data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


# ---------------------------------------------------------------------------
# routes


def test_health_ready_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "model": "openbagel-shapes"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["openbagel-shapes"] and models["object"] == "list"
    assert client.get("/v1/models/openbagel-shapes").json()["id"] == "openbagel-shapes"
    r = client.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_generations_n_gives_different_seeded_images(client, shapes_pipe):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 3, "seed": 7, **FAST})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [7, 8, 9]
    images = [decode(d["b64_json"]) for d in data]
    assert all(i.size == (64, 64) for i in images)
    assert len({i.tobytes() for i in images}) == 3  # n different images, never n copies
    # each equals the Python API's image for its seed, up to float rounding (a batch of 3 runs other shapes)
    ref = shapes_pipe.text_to_image("a red circle", seed=8, num_timesteps=4).image
    assert_images_close(images[1], ref, "image 2 of a batch vs its seed alone")
    assert r.headers["x-request-id"].startswith("req-")


def test_generations_pass_every_setting(client, shapes_pipe):
    knobs = {"guidance_scale": 2.0, "timestep_shift": 2.0, "cfg_interval": [0.2, 1.0], "cfg_renorm_type": "channel"}
    r = client.post(
        "/v1/images/generations", json={"prompt": "a blue square", "seed": 3, "size": "64x64", **FAST, **knobs}
    )
    assert r.status_code == 200, r.text
    got = decode(r.json()["data"][0]["b64_json"])
    ref = shapes_pipe.text_to_image(
        "a blue square", seed=3, width=64, height=64, num_timesteps=4, guidance_scale=2.0, timestep_shift=2.0,
        cfg_interval=(0.2, 1.0), cfg_renorm_type="channel",
    ).image  # fmt: skip
    assert got.size == (64, 64) and got.tobytes() == ref.tobytes()  # one image: the same computation
    plain = client.post("/v1/images/generations", json={"prompt": "a blue square", "seed": 3, "size": "64x64", **FAST})
    assert decode(plain.json()["data"][0]["b64_json"]).tobytes() != ref.tobytes()  # the guidance was not dropped
    r = client.post("/v1/images/generations", json={"prompt": "a blue square", "size": "48x32", **FAST})
    assert r.status_code == 400 and "this model draws 64x64 only" in r.text  # the size reaches the model's check


def test_generations_jpeg_and_think(client):
    r = client.post(
        "/v1/images/generations", json={"prompt": "a shape", "seed": 1, "output_format": "jpeg", "think": True, **FAST}
    )
    assert r.status_code == 200, r.text
    d = r.json()["data"][0]
    assert decode(d["b64_json"]).format == "JPEG"
    assert isinstance(d["reasoning_content"], str) and d["reasoning_content"]


def test_edits_size_follows_input_or_request(client, shapes_pipe):
    """The embedded model draws 64x64 only: a 64-px input sets the size, and so
    does a 48-px one (its only size); a size it cannot draw is refused, never ignored."""
    src = scene_image(64)
    files = {"image": ("in.png", png_bytes(src), "image/png")}
    r = client.post(
        "/v1/images/edits", files=files, data={"prompt": "make it blue", "seed": "2", "num_inference_steps": "4"}
    )
    assert r.status_code == 200, r.text
    out = decode(r.json()["data"][0]["b64_json"])
    ref = shapes_pipe.edit(src, "make it blue", seed=2, num_timesteps=4).image
    assert out.size == (64, 64) and out.tobytes() == ref.tobytes()  # one image: the same computation
    small = {"image": ("in.png", png_bytes(scene_image(48)), "image/png")}
    r = client.post("/v1/images/edits", files=small, data={"prompt": "make it blue", "num_inference_steps": "4"})
    assert r.status_code == 200 and decode(r.json()["data"][0]["b64_json"]).size == (64, 64)
    r = client.post(
        "/v1/images/edits", files=small, data={"prompt": "make it blue", "size": "64x64", "num_inference_steps": "4"}
    )
    assert decode(r.json()["data"][0]["b64_json"]).size == (64, 64)
    r = client.post(
        "/v1/images/edits", files=files, data={"prompt": "make it blue", "size": "32x32", "num_inference_steps": "4"}
    )
    assert r.status_code == 400 and "height 32 is not supported" in r.text  # never silently ignored


def test_edits_style_preset_and_several_images(client, shapes_pipe):
    src = scene_image()
    files = [("image[]", ("a.png", png_bytes(src), "image/png")), ("image[]", ("b.png", png_bytes(src), "image/png"))]
    r = client.post("/v1/images/edits", files=files, data={"style": "invert", "seed": "0", "num_inference_steps": "4"})
    assert r.status_code == 200, r.text
    ref = shapes_pipe.edit(src, style="invert", images=[src], seed=0, num_timesteps=4).image
    assert decode(r.json()["data"][0]["b64_json"]).tobytes() == ref.tobytes()


def test_chat_plain_with_image_and_usage(client, shapes_pipe):
    img = scene_image()
    question = "What colour is the circle?"
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": question}],
        }
    ]
    r = client.post("/v1/chat/completions", json={"model": "openbagel-shapes", "messages": msgs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": shapes_pipe.understand(img, question).text}
    assert body["choices"][0]["finish_reason"] == "stop"
    u = body["usage"]
    assert u["completion_tokens"] >= 1 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_history_is_sent_by_the_client(client, shapes_pipe):
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What shapes are there?"},
        {"role": "assistant", "content": "circles"},
        {"role": "user", "content": "And colours?"},
    ]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5})
    assert r.status_code == 200, r.text
    chat = shapes_pipe.chat("Answer briefly.")
    chat.add_text("What shapes are there?")
    chat.add_answer("circles")
    chat.add_text("And colours?")
    assert r.json()["choices"][0]["message"]["content"] == chat.reply(shapes_pipe.text_sampling(5))
    assert r.json()["usage"]["completion_tokens"] <= 5


def _stream(client, payload) -> list[dict]:
    r = client.post("/v1/chat/completions", json={**payload, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def test_chat_stream_equals_the_whole_answer(client):
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(scene_image())}},
                {"type": "text", "text": "How many shapes are there?"},
            ],
        }
    ]
    whole = client.post("/v1/chat/completions", json={"messages": msgs}).json()
    chunks = _stream(client, {"messages": msgs, "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.strip() == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_chat_reasoning_comes_back_apart(client):
    msgs = [{"role": "user", "content": "Draw a cool shape: which colour?"}]
    whole = client.post("/v1/chat/completions", json={"messages": msgs, "reasoning": True, "max_tokens": 40}).json()
    message = whole["choices"][0]["message"]
    assert "reasoning_content" in message
    chunks = _stream(client, {"messages": msgs, "reasoning": True, "max_tokens": 40})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas).strip()
    content = "".join(d.get("content", "") for d in deltas).strip()
    assert (reasoning, content) == (message["reasoning_content"] or "", message["content"])
    off = client.post("/v1/chat/completions", json={"messages": msgs, "reasoning_effort": "none", "max_tokens": 40})
    assert "reasoning_content" not in off.json()["choices"][0]["message"]


def test_requests_are_isolated(shapes_pipe):
    """edit -> understand -> generate -> understand on one server == each on a fresh server."""
    src = scene_image()
    ask = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(src)}},
                    {"type": "text", "text": "What colour is the circle?"},
                ],
            }
        ]
    }
    requests = [
        ("edit", {"prompt": "make it blue", "seed": "4", "num_inference_steps": "4"}),
        ("chat", ask),
        ("gen", {"prompt": "a green triangle", "seed": 5, **FAST}),
        ("chat", ask),
    ]

    def send(c, kind, payload):
        if kind == "edit":
            r = c.post("/v1/images/edits", files={"image": ("a.png", png_bytes(src), "image/png")}, data=payload)
            return r.json()["data"][0]["b64_json"]
        if kind == "gen":
            return c.post("/v1/images/generations", json=payload).json()["data"][0]["b64_json"]
        return c.post("/v1/chat/completions", json=payload).json()["choices"][0]["message"]["content"]

    shared = _client(shapes_pipe)
    try:
        answers = [send(shared, k, p) for k, p in requests]
    finally:
        shared.__exit__(None, None, None)
    fresh_pipe = BagelPipeline.from_pretrained()
    for (kind, payload), got in zip(requests, answers):
        fresh = _client(fresh_pipe)
        try:
            assert send(fresh, kind, payload) == got, kind
        finally:
            fresh.__exit__(None, None, None)


# ---------------------------------------------------------------------------
# bad input: the documented status and type, never a 500

BAD_JSON = [
    ("/v1/images/generations", {"prompt": "x", "guidance_scal": 4}, 400, "guidance_scal"),
    ("/v1/images/generations", {}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "n": 99}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "size": "100x64"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "4096x4096"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "num_inference_steps": 1000}, 400, "num_inference_steps"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    ("/v1/images/generations", {"prompt": "x", "cfg_renorm_type": "nope"}, 400, "cfg_renorm_type"),
    ("/v1/images/generations", {"prompt": "x", "timestep_shift": -1}, 400, None),
    ("/v1/images/generations", {"prompt": "x", "cfg_interval": [0.5]}, 400, "cfg_interval"),
    ("/v1/images/generations", {"prompt": 5}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "\ud800"}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x" * 500_000}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "n": True}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": "2"}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/v1/images/generations", {"prompt": "x", "think": "yes"}, 400, "think"),
    ("/v1/images/generations", {"prompt": "x", "size": "\u0661\u0666x\u0661\u0666"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": float("nan")}, 400, "guidance_scale"),
    ("/v1/images/generations", {"prompt": "x", "timestep_shift": 0}, 400, "timestep_shift"),
    ("/v1/images/generations", {"prompt": "x", "cfg_interval": [1, 0]}, 400, "cfg_interval"),
    ("/v1/images/generations", {"prompt": "x", "num_inference_steps": 1}, 400, "num_inference_steps"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["."]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": []}]}, 400, "messages[0].content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
        400,
        "messages[0].tool_calls",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "image_url": {"url": "http://x"}}]}]},
        400,
        "messages[0].content[0]",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"x": 1}}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6},
        400,
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}
            ]
        },
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}
            ]
        },
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "late"},
                {"role": "user", "content": "b"},
            ]
        },
        400,
        "messages[1]",
    ),
]


@pytest.mark.parametrize("route,payload,status,param", BAD_JSON)
def test_bad_json_requests(client, route, payload, status, param):
    # json.dumps writes NaN and escaped lone surrogates, as some clients do
    r = client.post(route, content=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_malformed_bodies(client):
    r = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/images/edits", files={"prompt": (None, "x")})  # multipart, no image
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = client.post("/v1/images/edits", data={"prompt": "x"})  # a urlencoded form
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", content=b"a prompt", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_messages_name_the_problem_and_the_fix(client):
    post = lambda body: client.post(  # noqa: E731
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    ).json()["error"]
    err = post(b"")
    assert "request body is empty" in err["message"] and err["param"] is None  # was "None is required"
    err = post(b'{"messages": [,]}')
    assert err["message"].startswith("the body is not valid JSON") and "at character 14" in err["message"]
    assert err["param"] is None and err["code"] == "invalid_json"  # was param "[14]"
    for value in (b"NaN", b"Infinity", b"-Infinity"):
        err = post(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + value + b"}")
        assert err["param"] == "temperature" and "must be a finite number" in err["message"]  # was "<= 2"


def test_tiny_temperatures_are_greedy_over_http(client):
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(scene_image())}},
                {"type": "text", "text": "What colour is the circle?"},
            ],
        }
    ]
    greedy = client.post("/v1/chat/completions", json={"messages": msgs, "temperature": 0})
    assert greedy.status_code == 200
    for t in (1e-300, 5e-324):
        r = client.post("/v1/chat/completions", json={"messages": msgs, "temperature": t, "seed": 1})
        assert r.status_code == 200, r.text  # was 500
        assert r.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
        chunks = _stream(client, {"messages": msgs, "temperature": t, "seed": 1})
        assert all("error" not in c for c in chunks)  # was 200, then an error event
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text.strip() == greedy.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "image,code",
    [
        (png_header_only(5000, 5000), "image_too_large"),  # our limit, from the header
        (png_header_only(100_000, 100_000), "image_too_large"),  # Pillow's own bomb guard
        (png_bytes(Image.new("RGB", (8, 8)), "TIFF"), "invalid_image_format"),
        (b"not an image", "invalid_image"),
        (b"", "invalid_image"),
    ],
)
def test_bad_uploads(client, image, code):
    r = client.post("/v1/images/edits", files={"image": ("x.png", image, "image/png")}, data={"prompt": "x"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == "image"


def test_malformed_exif_is_no_500(client):
    jpeg = bad_exif_jpeg()  # Pillow's exif_transpose raises struct.error on it
    r = client.post("/v1/images/edits", files={"image": ("x.jpg", jpeg, "image/jpeg")}, data={"prompt": "x", **FAST})
    assert r.status_code == 200, r.text
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    msgs = [{"role": "user", "content": parts}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2})
    assert r.status_code == 200, r.text


def _blank_png_url(side: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (side, side), "white"))).decode()


def test_images_are_decoded_only_once_admitted(shapes_pipe, monkeypatch):
    from openbagel.serve import inputs

    decoded = []
    real = inputs.load_image
    monkeypatch.setattr(inputs, "load_image", lambda data: decoded.append(len(data)) or real(data))
    c = _client(shapes_pipe, max_queue=0, limits=Limits(max_image_pixels=64 * 64))
    engine = c.app.state.engine
    try:
        one = [{"type": "image_url", "image_url": {"url": _blank_png_url(64)}}, {"type": "text", "text": "?"}]
        msgs = [{"role": "user", "content": one}]
        engine.running += 1  # the only slot is busy and nothing may wait: the next request is refused
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1})
        assert r.status_code == 429 and decoded == []  # refused before its image was decoded
        files = {"image": ("a.png", png_bytes(scene_image()), "image/png")}
        r = c.post("/v1/images/edits", files=files, data={"prompt": "x", **FAST})
        assert r.status_code == 429 and decoded == []
        engine.running -= 1
        # the pixel limit holds for the sum over a request's images (two 64x64 images: 8192 pixels)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": one + one}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large" and decoded == []
        assert "8192 pixels in all" in r.json()["error"]["message"]
        files = [("image[]", ("a.png", png_bytes(scene_image()), "image/png"))] * 2
        r = c.post("/v1/images/edits", files=files, data={"prompt": "x", **FAST})
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large" and decoded == []
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1})
        assert r.status_code == 200 and len(decoded) == 1  # admitted: decoded once
    finally:
        c.__exit__(None, None, None)


def test_a_full_queue_refuses_before_the_body_is_read(shapes_pipe, monkeypatch):
    """A burst of large bodies the queue cannot take was read, parsed and its
    base64 decoded before the 429 (1.2 GB stayed resident after 32 bodies of
    17 MB); a model request now meets the full queue before its body is read."""
    from openbagel.serve import app as app_module

    reads = []
    real = app_module._Guard._read_body
    monkeypatch.setattr(app_module._Guard, "_read_body", lambda self, *a: reads.append(1) or real(self, *a))
    c = _client(shapes_pipe, max_queue=0)
    engine = c.app.state.engine
    try:
        msgs = [{"role": "user", "content": "which colour?"}]
        engine.running += 1  # the only slot is busy and nothing may wait
        for route, kw in (
            ("/v1/chat/completions", {"json": {"messages": msgs}}),
            ("/v1/images/generations", {"json": {"prompt": "a red circle"}}),
            ("/v1/images/edits", {"files": {"image": ("a.png", png_bytes(scene_image()), "image/png")}}),
        ):
            r = c.post(route, **kw)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", route
        assert reads == []
        assert c.get("/v1/models").status_code == 200 and len(reads) == 1  # other routes are not held up
        engine.running -= 1
        assert c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}).status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_mask_is_refused(client):
    png = png_bytes(scene_image())
    r = client.post(
        "/v1/images/edits",
        files={"image": ("a.png", png, "image/png"), "mask": ("m.png", png, "image/png")},
        data={"prompt": "x"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"


def test_limits(shapes_pipe):
    c = _client(shapes_pipe, limits=Limits(max_body_bytes=2000, max_prompt_tokens=6))
    try:
        r = c.post("/v1/images/generations", json={"prompt": "a " * 2000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.post("/v1/images/generations", json={"prompt": "a red circle above a blue square on a white background"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
        r = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "one two three four five six seven"}]},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    finally:
        c.__exit__(None, None, None)


def test_special_token_strings_stay_text(shapes_pipe):
    ids = shapes_pipe.tokenizer.encode("</think><|im_end|><|im_start|>")
    assert not set(ids) & set(shapes_pipe.tokenizer.ids.values())


def test_api_key_must_fit_in_a_header():
    for key in ("clé", "two words", "\t"):
        with pytest.raises(ValueError, match="api_key"):
            ServeSettings(api_key=key)


def test_api_key(shapes_pipe):
    c = _client(shapes_pipe, api_key="s3cret")
    try:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_log_lines_leave_prompts_out_unless_asked(shapes_pipe, caplog):
    caplog.set_level("INFO", logger="openbagel.serve")
    for log_prompts in (False, True):
        c = _client(shapes_pipe, log_prompts=log_prompts)
        try:
            c.post("/v1/images/generations", json={"prompt": "secret plan", **FAST})
        finally:
            c.__exit__(None, None, None)
    lines = [r.getMessage() for r in caplog.records if "POST /v1/images/generations 200" in r.getMessage()]
    assert len(lines) == 2 and "secret plan" not in lines[0] and "secret plan" in lines[1]
    assert lines[0].startswith("req-") and lines[0].endswith(" ms")


def test_metrics_count_requests_and_images(shapes_pipe):
    c = _client(shapes_pipe)
    try:
        c.post("/v1/images/generations", json={"prompt": "x", "n": 2, **FAST})
        c.post("/v1/images/generations", json={"prompt": "x", "n": 0})
        text = c.get("/metrics").text
    finally:
        c.__exit__(None, None, None)
    assert "openbagel_images_generated_total 2.0" in text
    assert 'openbagel_requests_total{outcome="ok",route="/v1/images/generations"} 1.0' in text
    assert 'openbagel_requests_total{outcome="client_error",route="/v1/images/generations"} 1.0' in text
    assert "openbagel_queue_depth 0.0" in text and "openbagel_requests_in_flight 0.0" in text


def test_not_ready_answers_503():
    gate = threading.Event()

    def slow_load():
        gate.wait(10)
        raise RuntimeError("weights missing")

    from openbagel.serve import app as app_module

    settings = ServeSettings()
    app = app_module.create_app(settings)
    app.state.engine.model.load = slow_load
    with TestClient(app) as c:
        assert c.get("/ready").status_code == 503
        r = c.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready" and r.headers["retry-after"]
        assert c.get("/ready").status_code == 503
        text = c.get("/metrics").text
        # readiness polls while loading are no errors (5xx alerts fired on every restart)
        assert 'openbagel_requests_total{outcome="not_ready",route="/ready"} 2.0' in text
        assert 'outcome="error",route="/ready"' not in text
        gate.set()
        app.state.engine.wait_loaded(10)
        assert c.get("/ready").json()["status"] == "failed"
        assert c.post("/v1/images/generations", json={"prompt": "x"}).json()["error"]["code"] == "model_load_failed"


# ---------------------------------------------------------------------------
# the engine: queue bound, cancellation


def _engine(max_queue=1, max_concurrency=1) -> Engine:
    e = Engine(lambda: "pipe", max_queue, max_concurrency, Metrics())
    e.start()
    e.wait_loaded(5)
    return e


def test_queue_is_bounded_and_drains():
    async def main():
        e = _engine(max_queue=1)
        gate = threading.Event()
        e.admit()
        first = asyncio.ensure_future(e.run(lambda job: gate.wait(5) and "a", Job()))
        e.admit()
        second = asyncio.ensure_future(e.run(lambda job: "b", Job()))
        await asyncio.sleep(0.05)
        assert (e.running, e.waiting) == (1, 1)
        with pytest.raises(QueueFull):
            e.admit()
        gate.set()
        assert await first == "a" and await second == "b"
        assert (e.running, e.waiting) == (0, 0)
        e.admit()  # room again
        assert await e.run(lambda job: "c", Job()) == "c"

    asyncio.run(main())


def test_queue_depth_never_exceeds_the_queue_at_a_slot_handover():
    async def main():
        e = _engine(max_queue=1)
        gate = threading.Event()
        e.admit()
        first = asyncio.ensure_future(e.run(lambda job: gate.wait(5) and "a", Job()))
        e.admit()
        second = asyncio.ensure_future(e.run(lambda job: gate.wait(5) and "b", Job()))
        await asyncio.sleep(0.05)
        gate.set()
        await first  # the slot is free; the second request has not resumed to take it yet
        assert (e.running, e.waiting) == (0, 1)
        e.admit()  # a third fits: one running soon, one waiting
        assert e.queue_depth == 1 and e.waiting == 2
        with pytest.raises(QueueFull):
            e.admit()
        third = asyncio.ensure_future(e.run(lambda job: "c", Job()))
        assert await second == "b" and await third == "c"
        assert e.queue_depth == 0

    asyncio.run(main())


def test_disconnect_while_waiting_leaves_the_queue():
    async def main():
        e = _engine(max_queue=2)
        gate = threading.Event()
        e.admit()
        first = asyncio.ensure_future(e.run(lambda job: gate.wait(5), Job()))
        await asyncio.sleep(0.02)
        gone = False

        async def disconnected():
            return gone

        e.admit()
        second = asyncio.ensure_future(e.run(lambda job: "never", Job(), disconnected))
        await asyncio.sleep(0.05)
        assert e.waiting == 1
        gone = True
        with pytest.raises(Cancelled):
            await second
        assert e.waiting == 0 and e.running == 1
        gate.set()
        await first
        assert e.running == 0

    asyncio.run(main())


def test_disconnect_while_running_stops_at_the_next_step():
    steps = []

    def work(job: Job):
        for i in range(500):
            job.on_step()
            steps.append(i)
            time.sleep(0.01)
        return "done"

    async def main():
        e = _engine()
        t0 = time.perf_counter()

        async def disconnected():
            return time.perf_counter() - t0 > 0.2

        e.admit()
        with pytest.raises(Cancelled):
            await e.run(work, Job(), disconnected)
        await asyncio.sleep(0.05)
        assert e.running == 0 and e.waiting == 0

    asyncio.run(main())
    assert 5 < len(steps) < 100  # stopped long before the 500 steps


THINKING = [  # decoded pieces -> (reasoning, answer)
    (["<th", "ink> plan", " a</th", "ink> pi", "nk"], ("plan a", "pink")),
    (["pink"], (None, "pink")),  # the model did not think: all answer (was all reasoning on the server)
    (["<think> cut sh", "ort"], ("cut short", "")),  # never closed: all reasoning
    # cut short inside a tag (max_tokens on a model whose tags are several
    # tokens): the tag's first letters are not text (they leaked as "<th" / ".<")
    (["<think> cut sh", "ort </th"], ("cut short", "")),
    (["<think> the center.", "<"], ("the center.", "")),
    ([" <t"], ("", "")),
    (["pink </think> x"], (None, "pink </think> x")),
]


@pytest.mark.parametrize("pieces,expect", THINKING)
def test_reasoning_splitter_holds_back_split_tags(pieces, expect):
    s = ReasoningSplitter()
    out = [p for piece in pieces for p in s.feed(piece)] + s.flush()
    reasoning, answer = expect
    assert "".join(t for k, t in out if k == "reasoning").strip() == (reasoning or "")
    assert "".join(t for k, t in out if k == "content").strip() == answer
    assert split_reasoning("".join(pieces)) == expect


@pytest.mark.parametrize("pieces,expect", THINKING)
def test_thinking_splits_alike_in_python_and_on_the_server(client, shapes_pipe, monkeypatch, pieces, expect):
    def reply_stream(self, params, generator=None, remember=True, on_token=None):
        for piece in pieces:
            if on_token is not None:
                on_token(0)
            yield piece

    monkeypatch.setattr(Chat, "reply_stream", reply_stream)
    reasoning, answer = expect
    result = shapes_pipe.understand(None, "Which colour?", think=True)
    assert (result.reasoning, result.text) == expect
    msgs = [{"role": "user", "content": "Which colour?"}]
    message = client.post("/v1/chat/completions", json={"messages": msgs, "reasoning": True}).json()
    message = message["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == expect
    deltas = [c["choices"][0]["delta"] for c in _stream(client, {"messages": msgs, "reasoning": True})]
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == (reasoning or "")
    assert "".join(d.get("content", "") for d in deltas).strip() == answer


def test_ui_mounts_at_slash_ui(shapes_pipe):
    c = _client(shapes_pipe, ui=True)
    try:
        r = c.get("/ui/")
        assert r.status_code == 200 and "gradio" in r.text.lower()
        assert c.get("/health").json() == {"status": "ok"}  # the API is still there
    finally:
        c.__exit__(None, None, None)


def test_ui_behind_an_api_key_asks_for_it(shapes_pipe):
    c = _client(shapes_pipe, ui=True, api_key="k1")
    try:
        assert c.get("/ui/config").status_code == 401
        assert c.post("/ui/login", data={"username": "me", "password": "wrong"}).status_code != 200
        assert c.post("/ui/login", data={"username": "me", "password": "k1"}).json() == {"success": True}
        assert c.get("/ui/config").status_code == 200
    finally:
        c.__exit__(None, None, None)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "0"], "--port must be in 1..65535"),
        (["--max-queue", "-1"], "--max-queue must be a whole number >= 0"),
        (["--max-n", "0"], "--max-n must be a whole number >= 1"),
        (["--max-body-mb", "inf"], "--max-body-mb must be"),
        (["--header-timeout", "0"], "--header-timeout must be a number of seconds above 0"),
        (["--body-timeout", "nan"], "--body-timeout must be a number of seconds above 0"),
        (["--host", "999.1.1.1"], "--host '999.1.1.1' is not an address"),
        (["--api-key", "clé"], "--api-key must be printable ASCII"),
        (["--model", "/nonexistent"], "/nonexistent"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(args, message):
    from typer.testing import CliRunner

    from openbagel.cli import app

    r = CliRunner().invoke(app, ["serve", *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_serve_refuses_a_port_in_use():
    import socket

    from typer.testing import CliRunner

    from openbagel.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--port", str(port)])
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output, r.output


# ---------------------------------------------------------------------------
# connections: idle, slow headers, slow bodies


@pytest.fixture
def live_app(shapes_pipe):
    """The app behind a real uvicorn (in a thread) with short timeouts; yields its (host, port)."""
    import socket as socket_module

    import uvicorn

    from openbagel.serve import uvicorn_options

    settings = ServeSettings(keep_alive_timeout=0.3, header_timeout=0.3, body_timeout=0.3)
    with socket_module.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings, pipe=shapes_pipe), host="127.0.0.1", port=port, log_level="warning",
        **uvicorn_options(settings),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(10)


def _closed_by_server(sock) -> bytes:
    """What the server sends before it closes the connection (the socket's
    10 s timeout only guards the test: the server's own timeouts are 0.3 s)."""
    sock.settimeout(10)
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


def test_idle_and_slow_connections_are_closed(live_app):
    import socket as socket_module

    # connects and sends nothing
    with socket_module.create_connection(live_app) as s:
        assert _closed_by_server(s) == b""
    # sends half its headers, then stalls (slowloris)
    with socket_module.create_connection(live_app) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert _closed_by_server(s) == b""
    # a whole request, then idle on the kept-alive connection
    with socket_module.create_connection(live_app) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = _closed_by_server(s)
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b'{"status":"ok"}')
    # headers in, body sent slowly: 408
    with socket_module.create_connection(live_app) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        s.sendall(b'Content-Length: 100\r\n\r\n{"messages"')
        got = _closed_by_server(s)
        assert got.startswith(b"HTTP/1.1 408") and b"--body-timeout" in got


def test_timeouts_must_be_positive():
    for name in ("keep_alive_timeout", "header_timeout", "body_timeout"):
        with pytest.raises(ValueError, match=name):
            ServeSettings(**{name: 0})


def test_docs_work_offline(client):
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for url in assets:  # every script, style sheet and icon comes from this server, none from a CDN
        assert url.startswith("/"), url
        r = client.get(url)
        assert r.status_code == 200 and len(r.content) > 100, url
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/v1/chat/completions"]
    # images/edits reads its multipart form itself: its fields are declared for /docs all the same
    form = paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "image[]", "prompt", "style", "size", "seed", "num_inference_steps"} <= set(form["properties"])


def test_threads_per_slot_share_the_available_cores(monkeypatch, tmp_path):
    from openbagel.serve import settings as settings_module

    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(settings_module, "CGROUP_CPU_MAX", cpu_max)
    assert settings_module.available_cores() == 8  # no cgroup file: the affinity
    cpu_max.write_text("max 100000\n")
    assert settings_module.available_cores() == 8
    cpu_max.write_text("250000 100000\n")  # a quota of 2.5 cores
    assert settings_module.available_cores() == 3
    cpu_max.write_text("max 100000\n")
    assert [ServeSettings(max_concurrency=n).threads_per_slot for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert ServeSettings(max_concurrency=4, threads=3).threads_per_slot == 3
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        ServeSettings(threads=0)
    assert ServeSettings(max_concurrency=2, threads=512).threads_per_slot == 512
    # --threads 100000 crashed the server (no thread could be started)
    with pytest.raises(
        ValueError, match=r"threads 100000 x max_concurrency 1 is more than 1024 threads in all; use at most"
    ):
        ServeSettings(threads=100000)
    with pytest.raises(ValueError, match="threads 600 x max_concurrency 2 is more than 1024"):
        ServeSettings(max_concurrency=2, threads=600)
