"""The webhook receiver: signed deliveries are recorded, tampered/expired ones refused, replays dropped, and a
succeeded training is imported exactly once (end to end with the stand-in sending real signed webhooks)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import write_dataset_zip

from finetune.config import load_config
from finetune.recipes.train_remote import attach, train_remote
from finetune.registry import Registry
from finetune.webhooks import WebhookReceiver


@pytest.fixture
def receiver(replicate_stub, tmp_path):
    calls = []

    def import_once(tid):
        calls.append(tid)
        return attach(tid, runs_root=tmp_path / "runs")

    rx = WebhookReceiver(replicate_stub.webhook_secret, runs_root=tmp_path / "runs", on_succeeded=import_once,
                         log=lambda m: None).start()  # fmt: skip
    rx.calls = calls
    yield rx
    rx.stop()


def post(rx, body: bytes, headers: dict) -> httpx.Response:
    return httpx.post(rx.url, content=body, headers=headers, timeout=5)


def test_signed_tampered_expired_and_replayed_deliveries(replicate_stub, receiver, tmp_path):
    run = tmp_path / "runs" / "tok-remote-abc"
    run.mkdir(parents=True)
    (run / "remote.json").write_text(json.dumps({"training_id": "t1"}))
    body = json.dumps({"id": "t1", "status": "processing", "logs": "a\nb"}).encode()
    headers = replicate_stub.signed_headers(body)

    assert post(receiver, body, headers).status_code == 200
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [(e["training_id"], e["status"], e["last_log_line"]) for e in events] == [("t1", "processing", "b")]

    tampered = body.replace(b"processing", b"succeeded")
    assert post(receiver, tampered, headers).status_code == 401
    expired = replicate_stub.signed_headers(body, timestamp=int(time.time()) - 301)
    assert post(receiver, body, expired).status_code == 401
    replay = post(receiver, body, headers)  # same webhook-id: acknowledged, dropped
    assert replay.status_code == 200 and replay.json() == {"duplicate": True}
    assert len((run / "events.jsonl").read_text().splitlines()) == 1

    other = json.dumps({"id": "t9", "status": "starting"}).encode()
    assert post(receiver, other, replicate_stub.signed_headers(other)).status_code == 200
    assert "t9" in (tmp_path / "runs" / "webhooks-unmatched.jsonl").read_text()

    # A restarted receiver remembers the ids it has seen: the replay is still dropped.
    again = WebhookReceiver(replicate_stub.webhook_secret, runs_root=tmp_path / "runs", log=lambda m: None)
    assert again.handle(headers, body) == (200, {"duplicate": True})
    again._server.server_close()
    assert receiver.calls == []


def test_succeeded_webhook_imports_the_version_exactly_once(replicate_stub, receiver, tmp_path):
    zip_path = write_dataset_zip(tmp_path / "d.zip", [(32, 32), (40, 32)])
    cfg = load_config(None, [f"dataset={zip_path}", "backend=replicate", "output=me/hook"])
    assert train_remote(cfg, detach=True, webhook=receiver.url) is None
    (tid,) = replicate_stub.trainings
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (receiver.calls and all(not t.is_alive() for t in receiver.imports)):
        time.sleep(0.05)
    assert receiver.calls == [tid]
    (version,) = Registry().versions("me/hook")
    assert version.lineage["replicate"]["training_id"] == tid

    # The "completed" event delivered again under a new id (not a replay): still imported only once.
    completed = [d for d in replicate_stub.webhook_deliveries if d["body"]["status"] == "succeeded"]
    assert len(completed) == 1 and completed[0]["status"] == 200
    assert replicate_stub.deliver(receiver.url, completed[0]["body"]) == 200
    time.sleep(0.1)
    assert receiver.calls == [tid] and len(Registry().versions("me/hook")) == 1
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    statuses = [json.loads(line)["status"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert statuses[0] == "processing" and statuses.count("succeeded") == 2
