"""The server end to end on loopback: the official openai client, the real CLI, and load with two adapters."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.unit.test_export_formats import tiny_run
from tuneloop.serve.config import ServeConfig
from tuneloop.serve.predict import Predictor
from tuneloop.serve.server import BackgroundServer

pytestmark = pytest.mark.integration

TEXTS = ["charged twice this month", "dashboard crashes on export", "how do I invite my team"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    return {
        "A": tiny_run(tmp_path_factory.mktemp("a"), tiny_model_dir, seed=1, learning_rate=1e-2),
        "B": tiny_run(tmp_path_factory.mktemp("b"), tiny_model_dir, seed=2, learning_rate=2e-2),
    }


def test_official_openai_client(runs, tiny_model_dir):
    openai = pytest.importorskip("openai")
    settings = ServeConfig(
        base=str(tiny_model_dir),
        base_name="tiny",
        adapters=runs,
        port=0,
        precision="fp32",
        api_key="sk-local",
    )
    with BackgroundServer(settings) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-local", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "A", "B"]
        for name, run in runs.items():
            predictor = Predictor(run, precision="fp32", max_new_tokens=4)
            for text in TEXTS:
                reply = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": text}], max_tokens=4
                )
                assert reply.choices[0].message.content.strip() == predictor.predict(text).raw
                assert reply.usage.completion_tokens <= 4
        stream = client.chat.completions.create(
            model="A", messages=[{"role": "user", "content": TEXTS[0]}], max_tokens=4, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert (
            streamed.strip() == Predictor(runs["A"], precision="fp32", max_new_tokens=4).predict(TEXTS[0]).raw
        )
        completion = client.completions.create(model="B", prompt="hello", max_tokens=3)
        assert completion.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="C", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_two_hundred_mixed_requests_then_four_times_the_queue_limit(runs, tiny_model_dir):
    settings = ServeConfig(
        base=str(tiny_model_dir),
        base_name="tiny",
        adapters=runs,
        port=0,
        precision="fp32",
        max_batch_size=8,
        max_queue=256,
    )
    models = ["A", "B", "tiny"]

    async def burst(url, n):
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(
                *[
                    c.post(
                        "/v1/chat/completions",
                        json={
                            "model": models[i % 3],
                            "messages": [{"role": "user", "content": TEXTS[i % 3]}],
                            "max_tokens": 4,
                        },
                    )
                    for i in range(n)
                ]
            )

    with BackgroundServer(settings) as server:
        responses = asyncio.run(burst(server.url, 200))
        assert [r.status_code for r in responses] == [200] * 200
        answers: dict[int, set[str]] = {}
        for i, r in enumerate(responses):  # the same model and prompt get the same answer, whatever the batch
            answers.setdefault(i % 3, set()).add(r.json()["choices"][0]["message"]["content"])
        assert [len(a) for a in answers.values()] == [1, 1, 1]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert (
            float(
                next(
                    line.split()[1]
                    for line in metrics.splitlines()
                    if line.startswith("tuneloop_mixed_batches_total")
                )
            )
            > 0
        )

    limited = settings.model_copy(update={"max_queue": 8})
    with BackgroundServer(limited) as server:
        limit = limited.max_batch_size + limited.max_queue
        responses = asyncio.run(burst(server.url, 4 * limit))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) >= limit and codes.count(200) >= limit
        assert httpx.get(f"{server.url}/health").json() == {
            "status": "ok",
            "in_flight": 0,
            "adapters": ["A", "B"],
        }


def test_cli_serve_on_loopback_with_an_api_key(runs, tiny_model_dir, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "TUNELOOP_TEST_KEY": "k-123"}
    command = [
        sys.executable,
        "-m",
        "tuneloop.cli.main",
        "serve",
        "--base",
        str(tiny_model_dir),
        "--adapter",
        f"A={runs['A']}",
        "--port",
        str(port),
        "--api-key-env",
        "TUNELOOP_TEST_KEY",
        "--request-log",
        str(tmp_path / "log.jsonl"),
        "--precision",
        "fp32",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        # a cold start imports torch, transformers and PEFT and loads the model: on a loaded 2-core box that
        # took over 30 s once; wait up to 120 s, and stop at once if the server exited
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert process.poll() is None, f"the server exited (code {process.returncode}) before answering"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        listed = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k-123"}).json()["data"]
        assert [m["id"] for m in listed] == [tiny_model_dir.name, "A"]
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}" in output
    assert (tmp_path / "log.jsonl").read_text().count('"status": 401') == 1


def test_cli_refuses_a_public_bind_without_a_key(tiny_model_dir):
    from typer.testing import CliRunner

    from tuneloop.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--base", str(tiny_model_dir), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "exposes the server beyond this machine" in " ".join(
        result.output.split()
    )
