"""Endpoint baselines and the LLM judge against a local OpenAI-compatible server (127.0.0.1, started here)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from tuneloop.cli.main import app
from tuneloop.data import Message
from tuneloop.evaluate.endpoints import ChatClient, EndpointError

pytestmark = pytest.mark.integration

runner = CliRunner()


class FakeOpenAI:
    """Answers like a chat model: baseline prompts get 'billing'; judge prompts get verdicts that favour answers
    equal to the reference. Records every request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_next = 0

    def app(self):
        api = FastAPI()

        @api.post("/v1/chat/completions")
        async def complete(request: Request):
            body = await request.json()
            self.requests.append({"body": body, "auth": request.headers.get("authorization")})
            if self.fail_next:
                self.fail_next -= 1
                return JSONResponse({"error": "busy"}, status_code=503)
            text = body["messages"][-1]["content"]
            return {"choices": [{"message": {"role": "assistant", "content": self.reply(text)}}]}

        return api

    @staticmethod
    def reply(text: str) -> str:
        reference = re.search(r"Reference answer \(a correct answer, for guidance\):\n(.*?)\n\n", text, re.DOTALL)
        if "Answer to grade:" in text:
            answer = text.split("Answer to grade:\n", 1)[1].split("\n\nReply with JSON", 1)[0]
            return json.dumps({"score": 9 if answer.strip() == reference.group(1).strip() else 3, "reason": "r"})
        if "Answer A:" in text:
            a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0].strip()
            b = text.split("Answer B:\n", 1)[1].split("\n\nReply with JSON", 1)[0].strip()
            wanted = reference.group(1).strip()
            winner = "A" if a == wanted and b != wanted else "B" if b == wanted and a != wanted else "tie"
            return f'Verdict:\n{{"winner": "{winner}", "reason": "r"}}'
        return "billing"


@pytest.fixture(scope="module")
def server():
    import uvicorn

    fake = FakeOpenAI()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(fake.app(), log_level="error"))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started
    yield fake, f"http://127.0.0.1:{port}/v1"
    instance.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_client_retries_busy_server_and_sends_the_key(server, monkeypatch):
    fake, url = server
    fake.requests.clear()
    fake.fail_next = 1
    client = ChatClient("t", url, "m", api_key="sk-test", timeout_s=10)
    assert client.complete([Message("user", "hello")], 8) == "billing"
    assert len(fake.requests) == 2
    assert fake.requests[-1]["auth"] == "Bearer sk-test"
    assert fake.requests[-1]["body"]["temperature"] == 0.0 and fake.requests[-1]["body"]["max_tokens"] == 8
    with pytest.raises(EndpointError, match=r"nowhere \(http://127.0.0.1:9/v1/chat/completions, model m\)"):
        ChatClient("nowhere", "http://127.0.0.1:9/v1", "m", timeout_s=2).complete([Message("user", "x")], 4)


def eval_config(tmp_path, tiny_model_dir, tiny_dataset, url, cache, **extra) -> str:
    config = {
        "base_model": str(tiny_model_dir),
        "train_file": str(tiny_dataset["train"]),
        "test_file": str(tiny_dataset["test"]),
        "output_dir": str(tmp_path / "run"),
        "epochs": 1,
        "batch_size": 4,
        "precision": "fp32",
        "max_new_tokens": 4,
        "few_shot_k": 2,
        "regression_check": False,
        "bootstrap_samples": 100,
        "baselines": ["base", {"name": "paid-model", "base_url": url, "model": "gpt-x", "api_key_env": "TUNELOOP_TEST_KEY"}],
        "judge": {"base_url": url, "model": "judge-x", "rubric": "The answer is the right queue.", "mode": "pairwise", "cache_dir": str(cache)},
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_endpoint_baseline_and_pairwise_judge_with_cache(tmp_path, tiny_model_dir, tiny_dataset, server, monkeypatch):
    fake, url = server
    path = eval_config(tmp_path, tiny_model_dir, tiny_dataset, url, tmp_path / "judge-cache")
    assert runner.invoke(app, ["train", path]).exit_code == 0

    missing = runner.invoke(app, ["eval", path])
    assert missing.exit_code == 1
    assert "paid-model: environment variable TUNELOOP_TEST_KEY (api_key_env) is not set" in " ".join(missing.output.split())
    assert "eval finetuned" not in missing.output  # refused before any generation

    monkeypatch.setenv("TUNELOOP_TEST_KEY", "sk-local")
    fake.requests.clear()
    result = runner.invoke(app, ["eval", path])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"finetuned", "base", "paid-model"}
    rows = [json.loads(l) for l in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["paid-model"] == "billing" for r in rows)
    assert metrics["paid-model"]["accuracy"] == pytest.approx(sum(r["expected"] == "billing" for r in rows) / len(rows))
    assert "paid-model" in metrics["finetuned"]["comparisons"]
    baseline_calls = [r for r in fake.requests if r["body"]["model"] == "gpt-x"]
    assert len(baseline_calls) == len(rows) and all(r["auth"] == "Bearer sk-local" for r in baseline_calls)

    judge = json.loads((tmp_path / "run" / "eval" / "judge.json").read_text())
    assert judge["mode"] == "pairwise" and set(judge) >= {"base", "paid-model"}
    for baseline in ("base", "paid-model"):
        entry = judge[baseline]
        assert entry["wins"] + entry["ties"] + entry["losses"] == len(rows)
        # the fake judge prefers the answer equal to the reference: recompute its verdicts from predictions
        wins = sum(r["finetuned_raw"] == r["expected"] and r[f"{baseline}_raw"] != r["expected"] for r in rows)
        losses = sum(r[f"{baseline}_raw"] == r["expected"] and r["finetuned_raw"] != r["expected"] for r in rows)
        assert (entry["wins"], entry["losses"]) == (wins, losses)
        assert entry["position_consistency"] == 1.0
    # both orders for each differing pair (identical answers are a tie without asking); repeats come from the cache
    asked = {(r["input"], first, second) for b in ("base", "paid-model") for r in rows if r["finetuned_raw"] != r[f"{b}_raw"]
             for first, second in ((r["finetuned_raw"], r[f"{b}_raw"]), (r[f"{b}_raw"], r["finetuned_raw"]))}
    assert judge["requests"] == len(asked) > 0
    assert "LLM judge" in (tmp_path / "run" / "eval" / "report.html").read_text()

    fake.requests.clear()
    again = runner.invoke(app, ["eval", path])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run" / "eval" / "judge.json").read_text())["requests"] == 0
    assert not [r for r in fake.requests if r["body"]["model"] == "judge-x"]  # every verdict from the cache


def test_pointwise_judge_scores_each_system(tmp_path, tiny_model_dir, tiny_dataset, server, monkeypatch):
    fake, url = server
    monkeypatch.setenv("TUNELOOP_TEST_KEY", "sk-local")
    path = eval_config(tmp_path, tiny_model_dir, tiny_dataset, url, tmp_path / "cache")
    config = yaml.safe_load(open(path))
    config["judge"]["mode"] = "pointwise"
    config["gate"] = {"min_metric": {"judge_score": 9.5}}
    open(path, "w").write(yaml.safe_dump(config))
    assert runner.invoke(app, ["train", path]).exit_code == 0
    result = runner.invoke(app, ["eval", path])
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    rows = [json.loads(l) for l in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    for system in ("finetuned", "base", "paid-model"):
        expected = sum(9 if r[f"{system}_raw"] == r["expected"] else 3 for r in rows) / len(rows)
        assert metrics[system]["judge_score"] == pytest.approx(expected)
        low, high = metrics[system]["ci95"]["judge_score"]
        assert low <= expected <= high
    assert result.exit_code == 3  # judge_score can be gated like any metric; 9.5 is above what 3-or-9 scores give
    assert "finetuned judge_score >= 9.5" in result.output
