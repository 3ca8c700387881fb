"""The Replicate client against the stand-in server: errors, retries, pagination, files, downloads, webhooks."""

from __future__ import annotations

import email.utils
import hashlib
import time

import httpx
import pytest
from replicate_stub import TRAINER, TRAINER_VERSIONS

from finetune.replicate import (
    AmbiguousRequestError,
    Replicate,
    ReplicateError,
    load_token,
    retry_after_seconds,
    sign_webhook,
    verify_webhook,
)

# Test vector from replicate-python tests/test_webhooks.py (reference §6.2).
VECTOR = {
    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "headers": {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    },
    "body": b'{"test": 2432232314}',
}


class Sleeps(list):
    """Records the waits the client asks for instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(stub, **kw) -> Replicate:
    kw.setdefault("base_url", stub.url)
    return Replicate(stub.token, **kw)


def test_reference_webhook_vector_verifies_and_any_change_fails():
    h, body, secret, now = VECTOR["headers"], VECTOR["body"], VECTOR["secret"], 1614265330
    assert verify_webhook(h, body, secret, now=now)
    assert verify_webhook({k.upper(): v for k, v in h.items()}, body.decode(), secret, now=now + 299)
    assert not verify_webhook(h, b'{"test": 2432232315}', secret, now=now)  # tampered body
    assert not verify_webhook({**h, "webhook-id": "msg_other"}, body, secret, now=now)
    assert not verify_webhook({**h, "webhook-timestamp": "1614265331"}, body, secret, now=now)
    assert not verify_webhook(h, body, "whsec_" + "A" * 32, now=now)  # wrong key
    assert not verify_webhook(h, body, secret, now=now + 301)  # expired: outside the 300 s window
    assert not verify_webhook(h, body, secret, now=now - 301)
    assert not verify_webhook({k: v for k, v in h.items() if k != "webhook-signature"}, body, secret, now=now)
    several = {**h, "webhook-signature": "v1,bogus " + h["webhook-signature"]}
    assert verify_webhook(several, body, secret, now=now)
    assert sign_webhook(secret, h["webhook-id"], h["webhook-timestamp"], body) == h["webhook-signature"]


def test_retry_after_parses_seconds_http_date_and_the_429_hint():
    assert retry_after_seconds({"Retry-After": "7"}) == 7
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=1_000_000) == pytest.approx(30)
    assert retry_after_seconds({}, '{"detail":"Request was throttled. Your rate limit resets in ~12s."}') == 12
    assert retry_after_seconds({}, "nothing") is None


def test_token_comes_from_env_or_dotenv(tmp_path):
    assert load_token({"REPLICATE_API_TOKEN": "r8_env"}, tmp_path) == "r8_env"
    assert load_token({}, tmp_path) is None
    (tmp_path / ".env").write_text("# comment\nOTHER=1\nexport REPLICATE_API_TOKEN='r8_file'\n")
    assert load_token({}, tmp_path) == "r8_file"


def test_missing_token_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    with pytest.raises(ReplicateError, match="REPLICATE_API_TOKEN") as e:
        Replicate()
    assert e.value.exit_code == 2


def test_401_402_404_and_422_carry_problem_fields_and_advice(replicate_stub):
    with pytest.raises(ReplicateError) as e:
        Replicate("r8_wrong", replicate_stub.url).account()
    assert (e.value.status, e.value.title) == (401, "Unauthenticated")
    assert "REPLICATE_API_TOKEN" in str(e.value) and "r8_wrong" not in str(e.value)

    client = client_for(replicate_stub, base_url=replicate_stub.url + "/v1")  # a base URL ending in /v1 works too
    replicate_stub.fault("GET", "/v1/account", 402, body={"title": "Insufficient credit", "status": 402,
                         "detail": "You have insufficient credit to run this model."})  # fmt: skip
    with pytest.raises(ReplicateError) as e:
        client.account()
    assert e.value.status == 402 and "billing" in str(e.value)

    with pytest.raises(ReplicateError) as e:
        client.get_model("alice/missing")
    assert e.value.status == 404

    with pytest.raises(ReplicateError) as e:
        client.create_training(TRAINER, TRAINER_VERSIONS[1], destination="alice/nope", input={"input_images": "x"})
    assert e.value.status == 404 and "remote.destination" in str(e.value)

    replicate_stub.add_model("alice/dest")
    bad = {"input_images": "https://x/y.zip", "steps": 1, "lora_rank": "big"}
    with pytest.raises(ReplicateError) as e:
        client.create_training(TRAINER, TRAINER_VERSIONS[1], destination="alice/dest", input=bad)
    err = e.value
    assert err.status == 422 and err.title == "Input validation failed"
    assert {f["field"] for f in err.invalid_fields} == {"input.steps", "input.lora_rank"}
    lines = str(err).splitlines()
    assert any(line.strip().startswith("- input.steps:") for line in lines)
    assert any(line.strip().startswith("- input.lora_rank:") for line in lines)
    assert err.exit_code == 2


def test_429_honours_retry_after_and_the_body_hint(replicate_stub):
    sleeps = Sleeps()
    client = client_for(replicate_stub, sleep=sleeps)
    replicate_stub.fault("GET", "/v1/account", 429, body={"detail": "throttled"}, headers={"Retry-After": "7"})
    replicate_stub.fault("GET", "/v1/account", 429, body={"detail": "Your rate limit resets in ~3s."})
    assert client.account()["username"] == "alice"
    assert sleeps == [7.0, 3.0]
    assert replicate_stub.count("GET", "/v1/account") == 3


def test_429_on_a_create_is_retried_because_nothing_was_created(replicate_stub):
    sleeps = Sleeps()
    client = client_for(replicate_stub, sleep=sleeps)
    replicate_stub.add_model("alice/dest")
    replicate_stub.fault("POST", r".*/trainings", 429, body={"detail": "Your rate limit resets in ~2s."})
    t = client.create_training(TRAINER, TRAINER_VERSIONS[1], destination="alice/dest", input={"input_images": "u"})
    assert t["status"] == "starting" and sleeps == [2.0] and len(replicate_stub.trainings) == 1


def test_503_is_retried_with_backoff_then_gives_up(replicate_stub):
    sleeps = Sleeps()
    client = client_for(replicate_stub, sleep=sleeps, max_retries=3, retry_base=0.5, retry_cap=4)
    replicate_stub.fault("GET", "/v1/hardware", 503, body={"detail": "busy"}, times=2)
    assert client.hardware()[0]["sku"] == "cpu"
    assert len(sleeps) == 2 and all(0.25 <= s <= 4 for s in sleeps)
    replicate_stub.fault("GET", "/v1/hardware", 503, body={"detail": "down"}, times=10)
    with pytest.raises(ReplicateError) as e:
        client.hardware()
    assert e.value.status == 503 and e.value.exit_code == 1


def test_read_timeout_on_a_get_is_retried(replicate_stub):
    client = client_for(replicate_stub, timeout=httpx.Timeout(2.0, read=0.2), sleep=Sleeps())
    replicate_stub.fault("GET", "/v1/account", mode="delay", delay=0.5)
    assert client.account()["username"] == "alice"
    assert replicate_stub.count("GET", "/v1/account") == 2


def test_a_create_is_never_retried_after_sending(replicate_stub):
    client = client_for(replicate_stub, sleep=Sleeps())
    replicate_stub.add_model("alice/dest")
    replicate_stub.fault("POST", r".*/trainings", 502, body={"detail": "bad gateway"})
    with pytest.raises(AmbiguousRequestError):
        client.create_training(TRAINER, TRAINER_VERSIONS[1], destination="alice/dest", input={"input_images": "u"})
    replicate_stub.fault("POST", r".*/trainings", mode="drop_after")
    with pytest.raises(AmbiguousRequestError):
        client.create_training(TRAINER, TRAINER_VERSIONS[1], destination="alice/dest", input={"input_images": "u"})
    assert replicate_stub.count("POST", r".*/trainings") == 2
    assert len(replicate_stub.trainings) == 1  # the dropped one was carried out; nothing was sent twice


def test_pagination_follows_next_until_null(replicate_stub):
    replicate_stub.page_size = 2
    replicate_stub.add_model("alice/dest")
    client = client_for(replicate_stub)
    ids = [
        client.create_training(TRAINER, TRAINER_VERSIONS[0], destination="alice/dest", input={"input_images": "u"})[
            "id"
        ]
        for _ in range(5)
    ]
    listed = [t["id"] for t in client.list_trainings()]
    assert listed == ids[::-1]  # newest first, all pages
    assert replicate_stub.count("GET", "/v1/trainings") == 3
    assert [t["id"] for t in client.list_trainings(limit=3)] == ids[::-1][:3]
    assert [v["id"] for v in client.list_versions(TRAINER)] == list(TRAINER_VERSIONS[::-1])


def test_upload_streams_a_file_and_checks_sha256(replicate_stub, tmp_path):
    data = bytes(range(256)) * 40
    path = tmp_path / "d.zip"
    path.write_bytes(data)
    client = client_for(replicate_stub)
    f = client.upload_file(path, metadata={"k": "v"})
    assert f["size"] == len(data) and f["checksums"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert client.get_file(f["id"])["name"] == "d.zip"
    with pytest.raises(ReplicateError, match="sha256"):
        client.upload_file(path, sha256="0" * 64)  # the local digest does not match what arrived
    client.delete_file(f["id"])
    with pytest.raises(ReplicateError) as e:
        client.get_file(f["id"])
    assert e.value.status == 404


def test_413_upload_names_the_prepare_option(replicate_stub, tmp_path):
    replicate_stub.max_file_bytes = 1000
    path = tmp_path / "big.zip"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(ReplicateError) as e:
        client_for(replicate_stub).upload_file(path)
    assert e.value.status == 413 and "--max-side" in str(e.value)


def test_download_sends_the_token_only_to_trusted_hosts(replicate_stub, tmp_path):
    client = client_for(replicate_stub)
    assert client.is_trusted(replicate_stub.url + "/v1/x")
    assert client.is_trusted("https://replicate.delivery/xezq/a/trained_model.tar")
    assert client.is_trusted("https://pbxt.replicate.delivery/a.png")
    assert not client.is_trusted("http://replicate.delivery/a")  # not over HTTPS
    assert not client.is_trusted("https://replicate.delivery.evil.com/a")
    assert not client.is_trusted(replicate_stub.delivery_url + "/x")  # another origin
    replicate_stub.blobs["/delivery/x.bin"] = b"abc" * 1000
    out = client.download(replicate_stub.delivery_url + "/delivery/x.bin", tmp_path / "x.bin")
    assert out.read_bytes() == b"abc" * 1000
    assert replicate_stub.auth_seen_by_delivery == [""]
    with pytest.raises(ReplicateError, match="exceeds"):
        client.download(replicate_stub.delivery_url + "/delivery/x.bin", tmp_path / "y.bin", max_bytes=100)
    assert not (tmp_path / "y.bin").exists() and not list(tmp_path.glob(".y.bin*"))


def test_prediction_with_prefer_wait_returns_output(replicate_stub, tmp_path):
    client = client_for(replicate_stub)
    replicate_stub.add_model("alice/dest")
    t = client.create_training(TRAINER, TRAINER_VERSIONS[1], destination="alice/dest", input={"input_images": "u"})
    deadline = time.monotonic() + 5
    while t["status"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.05)
        t = client.get_training(t["id"])
    pred = client.create_prediction(t["output"]["version"], {"prompt": "TOK", "num_outputs": 2, "seed": 1}, wait=5)
    assert pred["status"] == "succeeded" and len(pred["output"]) == 2
    png = client.download(pred["output"][0], tmp_path / "o.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    slow = client.create_prediction(t["output"]["version"], {"prompt": "TOK"}, wait=False)
    assert client.wait_prediction(slow, interval=0.01)["status"] == "succeeded"
    with pytest.raises(ReplicateError) as e:
        client.create_prediction(t["output"]["version"], {"prompt": "TOK", "num_outputs": 9}, wait=1)
    assert e.value.status == 422 and e.value.invalid_fields[0]["field"] == "input.num_outputs"
    assert client.webhook_secret().startswith("whsec_")
    assert "token" not in repr(client).lower() and replicate_stub.token not in repr(client)
