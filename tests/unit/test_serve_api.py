"""The HTTP server on loopback with two tiny adapters: answers, batching, limits, auth, admin and logs."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest

from tests.unit.test_export_formats import tiny_run
from tuneloop.serve.config import ServeConfig
from tuneloop.serve.predict import Predictor
from tuneloop.serve.server import BackgroundServer

pytestmark = pytest.mark.unit

TEXTS = ["charged twice this month", "dashboard crashes on export", "how do I invite my team"]
API_KEY, ADMIN_KEY = "test-key-123", "admin-key-456"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """An adapter directory: two trained runs A and B, a copy C for runtime loads, and bad entries."""
    root = tmp_path_factory.mktemp("adapters")
    a = tiny_run(tmp_path_factory.mktemp("a"), tiny_model_dir, seed=1, learning_rate=1e-2)
    b = tiny_run(tmp_path_factory.mktemp("b"), tiny_model_dir, seed=2, learning_rate=2e-2)
    for name, run in (("A", a), ("B", b), ("C", a)):
        shutil.copytree(run / "adapter", root / name / "adapter")
    shutil.copytree(a / "adapter", root / "pickled")
    (root / "pickled" / "adapter_model.safetensors").rename(root / "pickled" / "adapter_model.bin")
    shutil.copytree(a / "adapter", root / "drifted")
    meta = json.loads((root / "drifted" / "tuneloop.json").read_text())
    meta["chat_format"]["template_sha256"] = "0" * 64
    (root / "drifted" / "tuneloop.json").write_text(json.dumps(meta))
    shutil.copytree(a / "adapter", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(a / "adapter", outside / "adapter")
    (root / "evil").symlink_to(outside, target_is_directory=True)
    return {"root": root, "A": a, "B": b}


def config(adapters, tiny_model_dir, tmp_path, **overrides) -> ServeConfig:
    values = {
        "base": str(tiny_model_dir),
        "base_name": "tiny",
        "adapters": {"A": adapters["root"] / "A", "B": adapters["root"] / "B"},
        "adapter_dir": adapters["root"],
        "port": 0,
        "precision": "fp32",
        "api_key": API_KEY,
        "admin_key": ADMIN_KEY,
        "batch_window_ms": 30,
        "request_log": tmp_path / "requests.jsonl",
        "max_body_bytes": 4096,
    }
    return ServeConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def server(adapters, tiny_model_dir, tmp_path_factory):
    with BackgroundServer(config(adapters, tiny_model_dir, tmp_path_factory.mktemp("log"))) as running:
        yield running


def client(server, key=API_KEY) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {}
    )


def chat(model, text, max_tokens=4, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        **extra,
    }


def test_each_adapter_answers_like_its_own_predictor(server, adapters):
    with client(server) as c:
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models == ["tiny", "A", "B"]
        served = {
            name: [
                c.post("/v1/chat/completions", json=chat(name, t)).json()["choices"][0]["message"]["content"]
                for t in TEXTS
            ]
            for name in ("A", "B")
        }
    for name in ("A", "B"):
        predictor = Predictor(adapters[name], precision="fp32", max_new_tokens=4)
        assert [s.strip() for s in served[name]] == [predictor.predict(t).raw for t in TEXTS]
    assert served["A"] != served["B"]


def test_requests_for_different_adapters_share_one_forward(server):
    async def together():
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as c:
            return await asyncio.gather(
                *[c.post("/v1/chat/completions", json=chat(m, "hello")) for m in ("A", "B", "tiny")]
            )

    def mixed() -> float:
        text = client(server).get("/metrics").text
        return float(
            next(
                line.split()[1]
                for line in text.splitlines()
                if line.startswith("tuneloop_mixed_batches_total")
            )
        )

    before = mixed()
    responses = asyncio.run(together())
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert mixed() > before


def test_streaming_sends_the_same_answer_as_sse(server):
    with client(server) as c:
        whole = c.post("/v1/chat/completions", json=chat("B", TEXTS[0])).json()["choices"][0]["message"][
            "content"
        ]
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json=chat("B", TEXTS[0], stream=True, stream_options={"include_usage": True}),
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]) == whole
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_completions_endpoint(server):
    with client(server) as c:
        body = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3}).json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(
    "key, path, status",
    [
        (None, "/v1/models", 401),
        ("wrong", "/v1/models", 401),
        (None, "/metrics", 401),
        (API_KEY, "/metrics", 200),
        (None, "/health", 200),
        (API_KEY, "/admin/adapters", 401),
        (ADMIN_KEY, "/admin/adapters", 200),
        (ADMIN_KEY, "/v1/models", 401),
    ],
)
def test_keys(server, key, path, status):
    with client(server, key) as c:
        assert c.get(path).status_code == status


def test_bad_requests_get_the_right_4xx(server):
    with client(server) as c:

        def post(**kwargs):
            return c.post("/v1/chat/completions", **kwargs)

        too_big = post(
            content=b'{"model": "A", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
        )
        assert too_big.status_code == 413
        bad_json = post(content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
        unknown = post(json=chat("nope", "x"))
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        over_context = post(json=chat("A", "x", max_tokens=250))  # tiny model: 256 positions
        assert (
            over_context.status_code == 400
            and over_context.json()["error"]["code"] == "context_length_exceeded"
        )
        assert post(json=chat("A", "x", max_tokens=5000)).status_code == 400  # over the max_tokens cap
        assert post(json={"model": "A", "messages": []}).status_code == 400
        assert post(json={**chat("A", "x"), "n": 2}).status_code == 400
        assert c.get("/nowhere").status_code == 404


@pytest.mark.parametrize(
    "name, status",
    [
        ("../../x", 400),
        ("/etc/passwd", 400),
        ("evil", 400),
        ("nope", 404),
        ("pickled", 422),
        ("drifted", 409),
        ("broken", 422),
    ],
)
def test_admin_refuses_bad_adapters(server, name, status):
    with client(server, ADMIN_KEY) as c:
        response = c.post("/admin/adapters/load", json={"name": name})
    assert response.status_code == status, response.text
    with client(server) as c:
        assert name not in [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_admin_loads_and_unloads_by_name(server):
    with client(server, ADMIN_KEY) as admin, client(server) as c:
        assert admin.post("/admin/adapters/load", json={"name": "C"}).status_code == 200
        assert (
            c.post("/v1/chat/completions", json=chat("C", TEXTS[0])).json()["choices"][0]["message"][
                "content"
            ]
            == c.post("/v1/chat/completions", json=chat("A", TEXTS[0])).json()["choices"][0]["message"][
                "content"
            ]
        )
        assert admin.post("/admin/adapters/unload", json={"name": "C"}).status_code == 200
        assert c.post("/v1/chat/completions", json=chat("C", TEXTS[0])).status_code == 404
        assert admin.post("/admin/adapters/unload", json={"name": "C"}).status_code == 404


def test_a_bad_load_under_traffic_fails_alone(server):
    async def traffic_and_bad_load():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60, headers=headers) as c,
            httpx.AsyncClient(
                base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ) as admin,
        ):
            requests = [
                c.post("/v1/chat/completions", json=chat(m, t)) for m in ("A", "B") for t in TEXTS * 3
            ]
            return await asyncio.gather(
                admin.post("/admin/adapters/load", json={"name": "broken"}), *requests
            )

    bad, *served = asyncio.run(traffic_and_bad_load())
    assert bad.status_code == 422
    assert [r.status_code for r in served] == [200] * len(served)


def test_request_log_lines(server):
    with client(server) as c:
        c.post("/v1/chat/completions", json=chat("A", TEXTS[1]))
    lines = [json.loads(line) for line in server.config.request_log.read_text().splitlines()]
    last = next(
        line for line in reversed(lines) if line["route"] == "/v1/chat/completions" and line["status"] == 200
    )
    assert last["model"] == last["adapter"] == "A"
    assert last["prompt_tokens"] > 0 and 1 <= last["completion_tokens"] <= 4
    assert last["latency_ms"] > 0 and last["time"].endswith("Z") and "prompt" not in last
    assert {line["status"] for line in lines} >= {200, 401, 404}


def test_overload_gets_429_and_the_server_stays_healthy(adapters, tiny_model_dir, tmp_path):
    settings = config(
        adapters, tiny_model_dir, tmp_path, max_batch_size=1, max_queue=2, api_key=None, batch_window_ms=0
    )

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(
                *[c.post("/v1/chat/completions", json=chat("A", "hello", max_tokens=8)) for _ in range(12)]
            )

    with BackgroundServer(settings) as running:
        responses = asyncio.run(burst(running.url))
        codes = [r.status_code for r in responses]
        assert codes.count(429) >= 1 and codes.count(200) >= 3 and set(codes) <= {200, 429}
        assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
        with httpx.Client(base_url=running.url) as c:
            assert c.get("/health").json()["in_flight"] == 0
            assert c.post("/v1/chat/completions", json=chat("A", "hello")).status_code == 200


def test_client_disconnect_frees_the_slot(adapters, tiny_model_dir, tmp_path):
    settings = config(
        adapters, tiny_model_dir, tmp_path, max_batch_size=1, max_queue=0, api_key=None, max_tokens_cap=200
    )

    def wait_until_free(c: httpx.Client) -> int:
        for _ in range(100):
            in_flight = c.get("/health").json()["in_flight"]
            if in_flight == 0:
                break
            time.sleep(0.05)
        return in_flight

    with BackgroundServer(settings) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=chat("A", "hi", max_tokens=180, stream=True)) as r:
            next(r.iter_lines())  # generation has started; now the client goes away
        assert wait_until_free(c) == 0
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            c.post("/v1/chat/completions", json=chat("A", "hi", max_tokens=180), timeout=0.05)
        assert wait_until_free(c) == 0
        assert c.post("/v1/chat/completions", json=chat("A", "hello")).status_code == 200
    ends = [line.get("finish_reason") for line in running.server.log.recent if line.get("model") == "A"]
    assert ends[:2] == ["disconnected", "disconnected"] and ends[2] in ("stop", "length")


def test_requests_that_outlive_the_timeout_get_504(adapters, tiny_model_dir, tmp_path):
    settings = config(adapters, tiny_model_dir, tmp_path, api_key=None, request_timeout_s=0.001, batch_window_ms=50)
    with BackgroundServer(settings) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        response = c.post("/v1/chat/completions", json=chat("A", "hello"))
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        assert c.get("/health").json()["in_flight"] == 0


def test_completions_stream(server):
    with client(server) as c:
        body = {"model": "A", "prompt": "hello", "max_tokens": 3, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "text_completion" for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
