"""A stand-in for Replicate's HTTP API: a real HTTP server on 127.0.0.1, run in a thread, for tests and benchmarks.

It follows ``reference/replicate-api.md`` and checks every JSON request body against the request schemas of the
official OpenAPI spec (``/work/shared/replicate/openapi.json``, or ``$REPLICATE_OPENAPI``), the way the real API
answers with problem+json. What it models:

* bearer auth (401 problem+json), account, hardware, models (get/create, 404, owner check), versions (paginated);
* the trainer ``ostris/flux-dev-lora-trainer`` with a ``TrainingInput`` schema built from the trainer's source
  (reference §9.1), so inputs are validated (422 with ``invalid_fields``);
* the trainer ``replicate/fast-flux-kontext-trainer`` (FLUX.1 Kontext edit LoRAs; flux-family-2026.md §3) with the
  inputs its model page documents; its ``output.weights`` is the LoRA ``.safetensors`` itself, with
  ``validation_images``. A third party reports it failing on every request: ``outcomes[KONTEXT_TRAINER] = "failed"``
  makes its trainings fail with an error and log lines; :meth:`ReplicateStub.add_trainer` adds any other trainer
  model (a user's own Cog trainer);
* trainings on a wall-clock lifecycle ``starting`` → ``processing`` (logs grow with ai-toolkit progress lines) →
  ``succeeded`` | ``failed`` | ``canceled`` | ``aborted``; the create response's ``urls`` point at ``/v1/predictions``
  (the quirk of the real API); ``output.weights`` is a tar holding ``output/flux_train_replicate/lora.safetensors``,
  served from a second origin ("delivery", like replicate.delivery) that records whether a token reached it;
* the Files API (multipart, sha256 checksums, 413 above ``max_file_bytes``), predictions with ``Prefer: wait``;
* pagination (``next`` URLs with a cursor, ``page_size`` per page);
* signed webhooks (Standard Webhooks scheme) posted to a training's ``webhook`` on start/logs/completed;
* injected faults: a status with problem+json and headers, a delayed answer, or a connection dropped after the
  request was carried out (:meth:`ReplicateStub.fault`).

``python tests/replicate_stub.py [--port N]`` serves it standalone and prints the base URL and token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import struct
import tarfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jsonschema

__all__ = [
    "KONTEXT_TRAINER",
    "KONTEXT_TRAINER_VERSION",
    "TRAINER",
    "TRAINER_VERSIONS",
    "ReplicateStub",
    "kontext_training_input_schema",
    "training_input_schema",
]

SPEC_PATH = Path(os.environ.get("REPLICATE_OPENAPI", "/work/shared/replicate/openapi.json"))
if not SPEC_PATH.is_file():  # a checkout may carry its own copy
    SPEC_PATH = Path(__file__).resolve().parents[1] / "shared" / "replicate" / "openapi.json"
TRAINER = "ostris/flux-dev-lora-trainer"
TRAINER_VERSIONS = (
    "26dce37af90b9d997eeb970d92e47de3064d46c300504ae376c75bef6a9022d2",  # older
    "d995297071a44dcb72244e6c19462111649ec86a9646c32df56daa7f14801944",  # latest
)
KONTEXT_TRAINER = "replicate/fast-flux-kontext-trainer"
KONTEXT_TRAINER_VERSION = "26c877b4ec3988b7e8edc5840e61339c68f09913bb11e23c31566590fd92a66d"  # the version seen (§3)
LORA_MEMBER = "output/flux_train_replicate/lora.safetensors"
DEFAULT_TOKEN = "r8_stubTOKEN0123456789abcdefSECRET"
DEFAULT_SECRET = "whsec_" + base64.b64encode(b"finetune-stub-webhook-signing-key").decode()


def _secret_field(title: str, desc: str) -> dict:
    return {"type": "string", "title": title, "format": "password", "x-cog-secret": True, "writeOnly": True,
            "description": desc}  # fmt: skip


def training_input_schema() -> dict:
    """Cog's JSON schema for ostris/flux-dev-lora-trainer's train() (FFT train.py @ 3dd14e3; reference §9.1)."""
    props: dict[str, dict] = {
        "input_images": {"type": "string", "format": "uri", "description": "A zip file containing the images."},
        "trigger_word": {"type": "string", "default": "TOK"},
        "autocaption": {"type": "boolean", "default": True},
        "autocaption_prefix": {"type": "string"},
        "autocaption_suffix": {"type": "string"},
        "steps": {"type": "integer", "default": 1000, "minimum": 3, "maximum": 6000},
        "learning_rate": {"type": "number", "default": 0.0004},
        "batch_size": {"type": "integer", "default": 1},
        "resolution": {"type": "string", "default": "512,768,1024"},
        "lora_rank": {"type": "integer", "default": 16, "minimum": 1, "maximum": 128},
        "caption_dropout_rate": {"type": "number", "default": 0.05, "minimum": 0, "maximum": 1},
        "optimizer": {"type": "string", "default": "adamw8bit"},
        "cache_latents_to_disk": {"type": "boolean", "default": False},
        "layers_to_optimize_regex": {"type": "string"},
        "gradient_checkpointing": {"type": "boolean", "default": False},
        "hf_repo_id": {"type": "string"},
        "hf_token": _secret_field("Hf Token", "Hugging Face token."),
        "wandb_api_key": _secret_field("Wandb Api Key", "Weights and Biases API key."),
        "wandb_project": {"type": "string", "default": "flux_train_replicate"},
        "wandb_run": {"type": "string"},
        "wandb_entity": {"type": "string"},
        "wandb_sample_interval": {"type": "integer", "default": 100, "minimum": 1},
        "wandb_sample_prompts": {"type": "string"},
        "wandb_save_interval": {"type": "integer", "default": 100, "minimum": 1},
        "skip_training_and_use_pretrained_hf_lora_url": {"type": "string"},
    }
    for i, (name, prop) in enumerate(props.items()):
        prop.setdefault("title", name.replace("_", " ").title())
        prop["x-order"] = i
    return {"type": "object", "title": "TrainingInput", "properties": props}


def kontext_training_input_schema() -> dict:
    """The Kontext trainer's TrainingInput as its model page documents it (flux-family-2026.md §3; no public source):
    ``input_images`` (a zip of ``x_start``/``x_end`` pairs, optional ``x.txt``), ``training_steps`` (1000, 100-20000),
    ``kontext_prompt_instruction``, ``seed``, ``hf_repo_id``, ``hf_token``. ``learning_rate`` and ``lora_rank``,
    which model cards of its LoRAs report, are not in it (a test adds them to check they are mapped when present)."""
    props: dict[str, dict] = {
        "input_images": {
            "type": "string",
            "format": "uri",
            "description": "A zip file of image pairs: <name>_start.<ext>, <name>_end.<ext> and optional <name>.txt.",
        },
        "training_steps": {"type": "integer", "default": 1000, "minimum": 100, "maximum": 20000},
        "kontext_prompt_instruction": {
            "type": "string",
            "description": "The edit instruction for pairs without a .txt file.",
        },
        "seed": {"type": "integer", "description": "Random seed; empty for a random one."},
        "hf_repo_id": {"type": "string"},
        "hf_token": _secret_field("Hf Token", "Hugging Face token."),
    }
    for i, (name, prop) in enumerate(props.items()):
        prop.setdefault("title", name.replace("_", " ").title())
        prop["x-order"] = i
    return {"type": "object", "title": "TrainingInput", "required": ["input_images"], "properties": props}


def predict_input_schema() -> dict:
    """The hotswap predictor's Input of a trained FLUX LoRA version (cog-flux HotswapPredictor; reference §9.4a)."""
    return {
        "type": "object",
        "title": "Input",
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string"},
            "aspect_ratio": {"type": "string", "enum": ["1:1", "16:9", "3:2", "2:3", "4:5", "5:4", "9:16", "custom"]},
            "num_outputs": {"type": "integer", "default": 1, "minimum": 1, "maximum": 4},
            "num_inference_steps": {"type": "integer", "default": 28, "minimum": 1, "maximum": 50},
            "guidance_scale": {"type": "number", "default": 3, "minimum": 0, "maximum": 10},
            "seed": {"type": "integer"},
            "output_format": {"type": "string", "enum": ["webp", "jpg", "png"], "default": "webp"},
            "lora_scale": {"type": "number", "default": 1, "minimum": -1, "maximum": 3},
            "megapixels": {"type": "string", "enum": ["1", "0.25"], "default": "1"},
            "width": {"type": "integer", "minimum": 256, "maximum": 1440},
            "height": {"type": "integer", "minimum": 256, "maximum": 1440},
        },
    }


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _rand_id(n: int = 26) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def lora_safetensors(seed: int, rank: int = 4, dim: int = 32) -> bytes:
    """A small LoRA in diffusers/peft key layout, as ai-toolkit saves for FLUX (numpy, no torch)."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    tensors = {}
    for block in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        tensors[f"transformer.{block}.lora_A.weight"] = rng.standard_normal((rank, dim)).astype(np.float16)
        tensors[f"transformer.{block}.lora_B.weight"] = rng.standard_normal((dim, rank)).astype(np.float16)
    return save(tensors, metadata={"format": "pt", "software": "ai-toolkit"})


def weights_tar(seed: int, rank: int, trigger: str) -> bytes:
    """The trainer's output tar (``tar -cvf trained_model.tar output/flux_train_replicate``; reference §9.3)."""
    buf = io.BytesIO()
    members = {
        LORA_MEMBER: lora_safetensors(seed, rank=min(rank, 8)),
        "output/flux_train_replicate/config.yaml": f"job: custom_sd_trainer\nrank: {rank}\n".encode(),
        "output/flux_train_replicate/captions/a.txt": f"a photo of {trigger}".encode(),
    }
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tiny_png(seed: int, size: int = 16) -> bytes:
    """A deterministic solid-colour PNG (stdlib only)."""
    r, g, b = (seed * 97) % 256, (seed * 57) % 256, (seed * 31) % 256
    row = b"\x00" + bytes([r, g, b]) * size
    raw = zlib.compress(row * size)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int = 500
    body: Any = None
    headers: dict = field(default_factory=dict)
    times: int = 1
    mode: str = "respond"  # respond | delay | drop_after | drop
    delay: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class ReplicateStub:
    """The stand-in. ``with ReplicateStub() as stub:`` starts it; ``stub.url`` is the base URL, ``stub.token`` the
    only token it accepts. Lifecycle timing (seconds): ``boot_s`` in ``starting``, ``train_s`` in ``processing``."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        username: str = "alice",
        boot_s: float = 0.2,
        train_s: float = 0.4,
        steps: int = 20,
        outcome: str = "succeeded",
        predict_s: float = 0.05,
        page_size: int = 100,
        max_file_bytes: int = 100 * 1024 * 1024,
        webhook_secret: str = DEFAULT_SECRET,
    ):
        self.token = token
        self.username = username
        self.boot_s, self.train_s, self.steps = boot_s, train_s, steps
        self.outcome = outcome
        self.outcomes: dict[str, str] = {}  # trainer model -> outcome, overriding ``outcome`` for that trainer
        self.predict_s = predict_s
        self.page_size = page_size
        self.max_file_bytes = max_file_bytes
        self.webhook_secret = webhook_secret
        self.spec = json.loads(SPEC_PATH.read_text())
        self.lock = threading.RLock()
        self.models: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.trainings: dict[str, dict] = {}
        self.predictions: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}  # delivery path -> bytes
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every API request
        self.auth_seen_by_delivery: list[str] = []  # Authorization headers that reached the delivery origin
        self.webhook_deliveries: list[dict] = []
        self.on_request = None  # optional callable(method, path) run before each API request is handled
        self.hardware = [
            {"sku": "cpu", "name": "CPU"},
            {"sku": "gpu-t4", "name": "Nvidia T4 GPU"},
            {"sku": "gpu-l40s", "name": "Nvidia L40S GPU"},
        ]
        self.trainer_specs: dict[str, dict] = {}  # trainer model -> how its trainings log, fail and return weights
        self._add_trainer()
        self.add_trainer(
            KONTEXT_TRAINER,
            kontext_training_input_schema(),
            versions=(KONTEXT_TRAINER_VERSION,),
            weights="safetensors",
            validation_images=True,
            head=["Running in cog mode...", "Extracting input_images...", "Found {pairs} image pairs",
                  "Loading FLUX.1 Kontext [dev]"],
            error="Prediction failed: 500 Internal Server Error",
            failure_logs=["Traceback (most recent call last):",
                          "  File \"/src/train.py\", line 211, in train",
                          "RuntimeError: upstream returned 500 Internal Server Error"],
        )  # fmt: skip
        self._api = _Server(("127.0.0.1", 0), self._handler(api=True))
        self._delivery = _Server(("127.0.0.1", 0), self._handler(api=False))
        self.url = f"http://127.0.0.1:{self._api.server_address[1]}"
        self.delivery_url = f"http://127.0.0.1:{self._delivery.server_address[1]}"
        self._threads: list[threading.Thread] = []

    # -- lifecycle of the stub ---------------------------------------------------------------------------------

    def start(self) -> ReplicateStub:
        for server in (self._api, self._delivery):
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for server in (self._api, self._delivery):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> ReplicateStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fault(self, method: str, path_regex: str, status: int = 500, *, body: Any = None, headers=None, times=1,
              mode: str = "respond", delay: float = 0.0) -> None:  # fmt: skip
        """Make the next ``times`` requests matching ``method`` and ``path_regex`` fail: ``respond`` answers with
        ``status`` and ``body``; ``delay`` waits ``delay`` s then answers normally; ``drop_after`` carries the
        request out and closes the connection without an answer; ``drop`` closes it without carrying it out."""
        with self.lock:
            self.faults.append(Fault(method, re.compile(path_regex), status, body, dict(headers or {}), times, mode,
                                     delay))  # fmt: skip

    def count(self, method: str, path_regex: str) -> int:
        pattern = re.compile(path_regex)
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and pattern.fullmatch(p))

    # -- fixtures ------------------------------------------------------------------------------------------------

    def _add_trainer(self) -> None:
        schema = {
            "openapi": "3.0.2",
            "info": {"title": "Cog", "version": "0.1.0"},
            "components": {
                "schemas": {
                    "Input": predict_input_schema(),
                    "TrainingInput": training_input_schema(),
                    "TrainingOutput": {"type": "object", "properties": {"weights": {"type": "string"}}},
                }
            },
        }
        versions = [
            {"id": vid, "created_at": f"2025-0{i + 1}-01T00:00:00Z", "cog_version": "0.14.0", "openapi_schema": schema}
            for i, vid in enumerate(TRAINER_VERSIONS)
        ]
        self.versions[TRAINER] = list(reversed(versions))  # newest first
        self.models[TRAINER] = self._model_obj("ostris", "flux-dev-lora-trainer", "public", "gpu-h100")

    def add_trainer(
        self,
        model: str,
        training_input: dict,
        *,
        versions: tuple[str, ...] | None = None,
        weights: str = "tar",
        validation_images: bool = False,
        head: list[str] | None = None,
        error: str = "CUDA out of memory. Tried to allocate 2.00 GiB",
        failure_logs: list[str] | None = None,
    ) -> str:
        """Add a public trainer model whose versions (newest last in ``versions``; default one random id) have the
        ``TrainingInput`` schema ``training_input``. ``weights`` is what ``output.weights`` points at: ``"tar"`` (the
        ostris layout) or ``"safetensors"`` (the LoRA itself); ``head`` the first log lines (``{pairs}`` and
        ``{trigger}`` filled in); ``error`` and ``failure_logs`` what a failed training reports. Returns the
        newest version id."""
        owner, name = model.split("/")
        versions = versions or (hashlib.sha256(model.encode()).hexdigest(),)
        schema = {
            "openapi": "3.0.2",
            "info": {"title": "Cog", "version": "0.1.0"},
            "components": {
                "schemas": {
                    "Input": predict_input_schema(),
                    "TrainingInput": training_input,
                    "TrainingOutput": {"type": "object", "properties": {"weights": {"type": "string"}}},
                }
            },
        }
        with self.lock:
            self.versions[model] = [
                {"id": vid, "created_at": f"2025-0{i + 1}-01T00:00:00Z", "cog_version": "0.16.0",
                 "openapi_schema": json.loads(json.dumps(schema))}
                for i, vid in reversed(list(enumerate(versions)))
            ]  # fmt: skip
            self.models[model] = self._model_obj(owner, name, "public", "gpu-h100")
            self.models[model]["latest_version"] = self.versions[model][0]
            self.trainer_specs[model] = {
                "weights": weights,
                "validation_images": validation_images,
                "head": head,
                "error": error,
                "failure_logs": failure_logs,
            }
        return versions[-1]

    def training_input(self, model: str, version: str | None = None) -> dict:
        """The TrainingInput schema of a trainer version (the newest by default), to change it in a test."""
        vs = self.versions[model]
        v = next(v for v in vs if v["id"] == version) if version else vs[0]
        return v["openapi_schema"]["components"]["schemas"]["TrainingInput"]

    def _model_obj(self, owner: str, name: str, visibility: str, hardware: str, description: str | None = None):
        return {"url": f"https://replicate.com/{owner}/{name}", "owner": owner, "name": name,
                "description": description, "visibility": visibility, "github_url": None, "paper_url": None,
                "license_url": None, "run_count": 0, "cover_image_url": None, "default_example": None,
                "latest_version": None, "hardware": hardware}  # fmt: skip

    def add_model(self, model: str, *, visibility: str = "private", hardware: str = "cpu") -> None:
        owner, name = model.split("/")
        with self.lock:
            self.models[model] = self._model_obj(owner, name, visibility, hardware)
            self.versions.setdefault(model, [])

    # -- training lifecycle --------------------------------------------------------------------------------------

    def _progress_lines(self, t: dict, upto: int) -> list[str]:
        total = t["steps"]
        lines = []
        for step in range(0, upto + 1):
            pct = int(100 * step / total)
            bar = ("█" * (pct // 10)).ljust(10)
            left = (total - step) * 1.5
            lines.append(
                f"flux_train_replicate: {pct:3d}%|{bar}| {step}/{total} [00:{int(step * 1.5):02d}<"
                f"{int(left // 60):02d}:{int(left % 60):02d},  1.50s/it, lr: 4.0e-04 "
                f"loss: {0.5 - step / (4 * total):.3e}]"
            )
        return lines

    def _render(self, t: dict) -> dict:
        """The training object as of now (wall-clock lifecycle)."""
        now = time.monotonic()
        elapsed = now - t["_t0"]
        status = "starting"
        logs = ""
        spec = self.trainer_specs.get(t["model"], {})
        head = [
            "Running in cog mode...",
            f"Using trigger word {t['input'].get('trigger_word', 'TOK')}",
            "Extracting input_images...",
            "Skipping autocaption: every image has a caption",
            "Loading Flux model (quantized: no)",
        ]
        if spec.get("head"):
            head = [
                line.format(pairs=t.get("_pairs", "?"), trigger=t["input"].get("trigger_word"))
                for line in spec["head"]
            ]
        if t.get("_canceled_at") is not None:
            status = "canceled"
            logs = "\n".join(head + ["Training canceled by user"])
        elif elapsed >= self.boot_s:
            status = "processing"
            frac = min(1.0, (elapsed - self.boot_s) / max(self.train_s, 1e-6))
            upto = int(frac * t["steps"])
            if t["_outcome"] == "aborted":
                status, logs = "aborted", ""
            else:
                if t["_outcome"] == "failed":
                    upto = min(upto, t["steps"] // 2)
                logs = "\n".join(head + self._progress_lines(t, upto))
                if frac >= 1.0:
                    status = t["_outcome"]
                    if status == "succeeded" and spec.get("head"):
                        logs += "\nSaved the LoRA\nTraining complete"
                    elif status == "succeeded":
                        logs += "\nSaved to output/flux_train_replicate/lora.safetensors\nTraining complete"
                    elif status == "failed" and spec.get("failure_logs"):
                        logs += "\n" + "\n".join(spec["failure_logs"])
                    elif status == "failed":
                        logs += "\nTraceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory."
                    elif status == "canceled":
                        logs += "\nTraining canceled: deadline reached"
        obj = {k: v for k, v in t.items() if not k.startswith("_") and k != "steps"}
        obj["status"] = status
        obj["logs"] = logs
        if status != "starting":
            obj["started_at"] = t["_started_iso"]
        if status in ("succeeded", "failed", "canceled", "aborted"):
            obj["completed_at"] = t.setdefault("_completed_iso", _now_iso())
            obj["metrics"] = {"predict_time": round(self.train_s, 3), "total_time": round(elapsed, 3)}
        if status == "failed":
            obj["error"] = spec.get("error") or "CUDA out of memory. Tried to allocate 2.00 GiB"
        if status == "aborted":
            obj["error"] = "Training was aborted before it started (deadline reached)"
        if status == "succeeded":
            obj["output"] = self._finish(t)
        return obj

    def _finish(self, t: dict) -> dict:
        if "_output" not in t:
            dest = t["_destination"]
            vid = hashlib.sha256(t["id"].encode()).hexdigest()
            seed = int(vid[:8], 16)
            spec = self.trainer_specs.get(t["model"], {})
            rank = int(t["input"].get("lora_rank", 16))
            if spec.get("weights") == "safetensors":  # the Kontext trainer's weights URI is the LoRA itself
                path = f"/delivery/{t['id']}/lora.safetensors"
                self.blobs[path] = lora_safetensors(seed, rank=min(rank, 8))
            else:
                path = f"/delivery/{t['id']}/trained_model.tar"
                self.blobs[path] = weights_tar(seed, rank, t["input"].get("trigger_word"))
            version = {"id": vid, "created_at": _now_iso(), "cog_version": "0.14.0",
                       "openapi_schema": {"components": {"schemas": {"Input": predict_input_schema()}}}}  # fmt: skip
            self.versions.setdefault(dest, []).insert(0, version)
            if dest in self.models:
                self.models[dest]["latest_version"] = version
            t["_output"] = {"version": f"{dest}:{vid}", "weights": self.delivery_url + path}
            if spec.get("validation_images"):
                image = f"/delivery/{t['id']}/validation-0.png"
                self.blobs[image] = tiny_png(seed)
                t["_output"]["validation_images"] = [self.delivery_url + image]
        return t["_output"]

    def _webhook_loop(self, tid: str) -> None:
        t = self.trainings[tid]
        events = set(t.get("webhook_events_filter") or ["start", "output", "logs", "completed"])
        sent: set[str] = set()
        while True:
            time.sleep(0.02)
            with self.lock:
                obj = self._render(t)
            status = obj["status"]
            if status != "starting" and "start" in events and "start" not in sent:
                self.deliver(t["webhook"], obj)
                sent.add("start")
            if status == "processing" and "logs" in events and "logs" not in sent and obj["logs"].count("/") > 3:
                self.deliver(t["webhook"], obj)
                sent.add("logs")
            if status in ("succeeded", "failed", "canceled", "aborted"):
                if "completed" in events:
                    self.deliver(t["webhook"], obj)
                return

    def signed_headers(self, body: bytes, *, webhook_id: str | None = None, timestamp: int | None = None) -> dict:
        """Headers of a delivery signed with the stub's secret (reference §6.2)."""
        wid = webhook_id or "msg_" + _rand_id(24)
        ts = str(int(time.time()) if timestamp is None else timestamp)
        key = base64.b64decode(self.webhook_secret.split("_", 1)[1])
        sig = base64.b64encode(hmac.new(key, f"{wid}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
        return {"webhook-id": wid, "webhook-timestamp": ts, "webhook-signature": f"v1,{sig}",
                "content-type": "application/json"}  # fmt: skip

    def deliver(self, url: str, obj: dict, **kw: Any) -> int:
        """POST a signed delivery of ``obj`` to ``url`` (no redirects followed, like Replicate); returns the status."""
        body = json.dumps(obj).encode()
        headers = self.signed_headers(body, **kw)
        try:
            status = httpx.post(url, content=body, headers=headers, timeout=5, follow_redirects=False).status_code
        except httpx.HTTPError:
            status = 0
        with self.lock:
            self.webhook_deliveries.append({"id": headers["webhook-id"], "status": status, "body": obj})
        return status

    # -- HTTP ----------------------------------------------------------------------------------------------------

    def _handler(self, api: bool):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if not size:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def send(self, status: int, obj: Any = None, *, headers=None, raw: bytes | None = None,
                     ctype: str = "application/json") -> None:  # fmt: skip
                data = raw if raw is not None else (b"" if obj is None else json.dumps(obj).encode())
                if status >= 400 and raw is None:
                    ctype = "application/problem+json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self, method: str) -> None:
                if not api:
                    stub.auth_seen_by_delivery.append(self.headers.get("authorization") or "")
                    blob = stub.blobs.get(urlsplit(self.path).path)
                    if blob is None:
                        return self.send(404, {"detail": "Not found", "status": 404})
                    return self.send(200, raw=blob, ctype="application/octet-stream")
                parts = urlsplit(self.path)
                path = parts.path
                body = self._body() if method in ("POST", "PATCH", "PUT") else b""
                with stub.lock:
                    stub.requests.append((method, path))
                if stub.on_request is not None:
                    stub.on_request(method, path)
                fault = None
                with stub.lock:
                    for f in stub.faults:
                        if f.method == method and f.pattern.fullmatch(path) and f.times > 0:
                            f.times -= 1
                            fault = f
                            break
                if fault and fault.mode == "respond":
                    return self.send(fault.status, fault.body, headers=fault.headers)
                if fault and fault.mode == "drop":  # the request never reaches the application
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault and fault.mode == "delay":
                    time.sleep(fault.delay)
                auth = self.headers.get("authorization") or ""
                if auth not in (f"Bearer {stub.token}", f"Token {stub.token}"):
                    return self.send(401, {"title": "Unauthenticated", "status": 401,
                                           "detail": "You did not pass a valid authentication token"})  # fmt: skip
                status, obj, headers = stub.route(method, path, parse_qs(parts.query), body, self.headers)
                if fault and fault.mode == "drop_after":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send(status, obj, headers=headers)

            def do_GET(self) -> None:
                self.handle_any("GET")

            def do_POST(self) -> None:
                self.handle_any("POST")

            def do_DELETE(self) -> None:
                self.handle_any("DELETE")

        return Handler

    def _problem(self, status: int, detail: str, title: str | None = None, invalid: list | None = None):
        obj: dict[str, Any] = {"detail": detail, "status": status}
        if title:
            obj["title"] = title
        if invalid is not None:
            obj["invalid_fields"] = invalid
        return status, obj, {}

    def _validate(self, schema: dict, body: Any, prefix: str = "") -> list[dict]:
        kinds = {"maximum": "number_lte", "minimum": "number_gte", "required": "required", "type": "invalid_type",
                 "enum": "enum", "additionalProperties": "additional_property_not_allowed"}  # fmt: skip
        validator = jsonschema.Draft7Validator(schema)
        out = []
        for err in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
            fld = ".".join([prefix] + [str(p) for p in err.path]) if prefix else ".".join(str(p) for p in err.path)
            out.append({"type": kinds.get(err.validator, err.validator), "field": fld, "description": err.message})
        return out

    def _spec_body(self, path: str, method: str) -> dict:
        op = self.spec["paths"][path][method]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        ref = schema.get("$ref")
        return self.spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema

    def _json_body(self, raw: bytes, spec_path: str, method: str = "post"):
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return None, self._problem(400, "Request body is not valid JSON", "Bad request")
        invalid = self._validate(self._spec_body(spec_path, method), body)
        if invalid:
            detail = "".join(f"- {f['field'] or 'body'}: {f['description']}\n" for f in invalid)
            return None, self._problem(422, detail, "Input validation failed", invalid)
        return body, None

    def _page(self, items: list, query: dict, path: str):
        start = int((query.get("cursor") or ["0"])[0])
        chunk = items[start : start + self.page_size]
        nxt = f"{self.url}{path}?cursor={start + self.page_size}" if start + self.page_size < len(items) else None
        prev = f"{self.url}{path}?cursor={max(0, start - self.page_size)}" if start else None
        return 200, {"next": nxt, "previous": prev, "results": chunk}, {}

    def route(self, method: str, path: str, query: dict, raw: bytes, headers: Any):
        with self.lock:
            return self._route(method, path, query, raw, headers)

    def _route(self, method: str, path: str, query: dict, raw: bytes, headers: Any):  # noqa: C901 - a router
        seg = path.strip("/").split("/")
        if seg[0] != "v1":
            return self._problem(404, "Not found")
        seg = seg[1:]
        if method == "GET" and seg == ["account"]:
            return 200, {"type": "user", "username": self.username, "name": "Alice", "github_url": None}, {}
        if method == "GET" and seg == ["hardware"]:
            return 200, self.hardware, {}
        if method == "GET" and seg == ["webhooks", "default", "secret"]:
            return 200, {"key": self.webhook_secret}, {}
        if seg == ["models"] and method == "POST":
            body, err = self._json_body(raw, "/models")
            if err:
                return err
            model = f"{body['owner']}/{body['name']}"
            if body["owner"] != self.username:
                return self._problem(403, f"You cannot create models owned by {body['owner']}", "Forbidden")
            if model in self.models:
                return self._problem(409, f"A model named {model} already exists", "Conflict")
            if body["hardware"] not in {h["sku"] for h in self.hardware}:
                return self._problem(422, f"Invalid hardware {body['hardware']}", "Invalid hardware")
            self.models[model] = self._model_obj(
                body["owner"], body["name"], body["visibility"], body["hardware"], body.get("description")
            )
            self.versions.setdefault(model, [])
            return 201, self.models[model], {}
        if seg[:1] == ["models"] and len(seg) >= 3:
            model = f"{seg[1]}/{seg[2]}"
            if model not in self.models:
                return self._problem(404, "Not found", "Not found")
            if len(seg) == 3 and method == "GET":
                return 200, self.models[model], {}
            if len(seg) == 4 and seg[3] == "versions" and method == "GET":
                return self._page(self.versions.get(model, []), query, path)
            if len(seg) >= 5 and seg[3] == "versions":
                version = next((v for v in self.versions.get(model, []) if v["id"] == seg[4]), None)
                if len(seg) == 5 and method == "GET":
                    return (200, version, {}) if version else self._problem(404, "Not found", "Not found")
                if len(seg) == 6 and seg[5] == "trainings" and method == "POST":
                    return self._create_training(model, version, raw)
            if len(seg) == 4 and seg[3] == "predictions" and method == "POST":
                body, err = self._json_body(raw, "/models/{model_owner}/{model_name}/predictions")
                if err:
                    return err
                return self._create_prediction(model, None, body, headers)
        if seg == ["trainings"] and method == "GET":
            items = [self._render(t) for t in reversed(list(self.trainings.values()))]  # newest first
            return self._page(items, query, path)
        if seg[:1] == ["trainings"] and len(seg) >= 2:
            t = self.trainings.get(seg[1])
            if t is None:
                return self._problem(404, "Not found", "Not found")
            if len(seg) == 2 and method == "GET":
                return 200, self._render(t), {}
            if len(seg) == 3 and seg[2] == "cancel" and method == "POST":
                if self._render(t)["status"] in ("starting", "processing"):
                    t["_canceled_at"] = time.monotonic()
                return 200, self._render(t), {}
        if seg == ["files"] and method == "POST":
            return self._create_file(raw, headers)
        if seg == ["files"] and method == "GET":
            return self._page([self._public(f) for f in reversed(list(self.files.values()))], query, path)
        if seg[:1] == ["files"] and len(seg) == 2:
            f = self.files.get(seg[1])
            if f is None:
                return self._problem(404, "File not found")
            if method == "GET":
                return 200, self._public(f), {}
            if method == "DELETE":
                del self.files[seg[1]]
                return 204, None, {}
        if seg == ["predictions"] and method == "POST":
            body, err = self._json_body(raw, "/predictions")
            if err:
                return err
            ref = body["version"]
            model, _, vid = ref.rpartition(":") if ":" in ref else ("", "", ref)
            version = None
            for m, vs in self.versions.items():
                for v in vs:
                    if v["id"] == vid and (not model or m == model):
                        version, model = v, m
            if version is None:
                return self._problem(422, "The specified version does not exist (or perhaps you don't have "
                                     "permission to use it?)", "Invalid version or not permitted")  # fmt: skip
            return self._create_prediction(model, version, body, headers)
        if seg[:1] == ["predictions"] and len(seg) >= 2:
            p = self.predictions.get(seg[1])
            if p is None:
                return self._problem(404, "Not found", "Not found")
            if len(seg) == 3 and seg[2] == "cancel" and method == "POST":
                p["_canceled"] = True
            return 200, self._render_prediction(p), {}
        return self._problem(404, f"No route for {method} {path}", "Not found")

    def _create_training(self, model: str, version: dict | None, raw: bytes):
        body, err = self._json_body(raw, "/models/{model_owner}/{model_name}/versions/{version_id}/trainings")
        if err:
            return err
        if version is None:
            return self._problem(422, "The specified version does not exist (or perhaps you don't have permission "
                                 "to use it?)", "Invalid version or not permitted")  # fmt: skip
        dest = body["destination"]
        if dest not in self.models or not dest.startswith(self.username + "/"):
            return self._problem(404, "The specified training destination does not exist")
        schema = version["openapi_schema"]["components"]["schemas"]["TrainingInput"]
        invalid = self._validate(schema, body["input"], prefix="input")
        if invalid:
            detail = "".join(f"- {f['field']}: {f['description']}\n" for f in invalid)
            return self._problem(422, detail, "Input validation failed", invalid)
        tid = _rand_id()
        t = {
            "id": tid,
            "model": model,
            "version": version["id"],
            "input": body["input"],
            "logs": "",
            "error": None,
            "output": None,
            "status": "starting",
            "source": "api",
            "created_at": _now_iso(),
            "started_at": None,
            "completed_at": None,
            "metrics": {},
            "urls": {
                "get": f"{self.url}/v1/trainings/{tid}",
                "cancel": f"{self.url}/v1/trainings/{tid}/cancel",
                "web": f"https://replicate.com/p/{tid}",
            },  # fmt: skip
            "webhook": body.get("webhook"),
            "webhook_events_filter": body.get("webhook_events_filter"),
            "steps": int(body["input"].get("steps", 1000)) if self.steps is None else self.steps,
            "_t0": time.monotonic(),
            "_started_iso": _now_iso(),
            "_outcome": self.outcomes.get(model, self.outcome),
            "_pairs": self._count_pairs(body["input"].get("input_images")),
            "_destination": dest,
        }
        self.trainings[tid] = t
        created = self._render(t)
        # The real create response points its urls at /v1/predictions (reference §2.1).
        quirk = f"{self.url}/v1/predictions/{tid}"
        created["urls"] = {"get": quirk, "cancel": quirk + "/cancel", "web": f"https://replicate.com/p/{tid}"}
        if t["webhook"]:
            threading.Thread(target=self._webhook_loop, args=(tid,), daemon=True).start()
        return 201, created, {"ratelimit-remaining": 2999, "ratelimit-reset": 1}

    def _count_pairs(self, url: Any) -> int | str:
        """The number of ``_end`` images in an uploaded zip (for the Kontext trainer's log), else ``?``."""
        fid = url.rsplit("/", 1)[-1] if isinstance(url, str) and url.startswith(self.url + "/v1/files/") else None
        content = self.files.get(fid, {}).get("_content") if fid else None
        if content is None:
            return "?"
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            return sum(1 for n in zf.namelist() if n.rsplit(".", 1)[0].endswith("_end"))

    def uploaded(self, url: str) -> bytes:
        """The bytes of the file a ``/v1/files/{id}`` URL names (what a trainer would download)."""
        return self.files[url.rsplit("/", 1)[-1]]["_content"]

    def _create_file(self, raw: bytes, headers: Any):
        ctype = headers.get("content-type", "")
        match = re.search(r'boundary="?([^";]+)"?', ctype)
        if not ctype.startswith("multipart/form-data") or not match:
            return self._problem(400, "Expected multipart/form-data", "Bad request")
        boundary = b"--" + match.group(1).encode()
        fields: dict[str, tuple[dict, bytes]] = {}
        for part in raw.split(boundary)[1:]:
            if part.startswith(b"--"):
                break
            head, _, data = part[2:].partition(b"\r\n\r\n")
            data = data[:-2] if data.endswith(b"\r\n") else data
            hdrs = dict(line.split(": ", 1) for line in head.decode("utf-8", "replace").split("\r\n") if ": " in line)
            disp = {k.lower(): v for k, v in hdrs.items()}.get("content-disposition", "")
            name = re.search(r'name="([^"]*)"', disp)
            filename = re.search(r'filename="([^"]*)"', disp)
            if name:
                fields[name.group(1)] = ({"filename": filename.group(1) if filename else None, **hdrs}, data)
        if "content" not in fields:
            missing = [{"type": "required", "field": "content", "description": "content is required"}]
            return self._problem(422, "content is required", "Input validation failed", missing)
        meta, content = fields["content"]
        if len(content) > self.max_file_bytes:
            return self._problem(413, "Files must be less than 100MB in size")
        fid = base64.urlsafe_b64encode(secrets.token_bytes(24)).decode().rstrip("=")
        name = (fields.get("filename", ({}, b""))[1].decode() or meta.get("filename") or "file")[:255]
        metadata = json.loads(fields["metadata"][1] or b"{}") if "metadata" in fields else {}
        created = time.time()
        obj = {
            "id": fid,
            "name": name,
            "content_type": (fields.get("type", ({}, b""))[1].decode() or "application/octet-stream"),
            "size": len(content),
            "etag": hashlib.md5(content).hexdigest(),
            "checksums": {"sha256": hashlib.sha256(content).hexdigest(), "md5": hashlib.md5(content).hexdigest()},
            "metadata": metadata,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created + 86400)),
            "urls": {"get": f"{self.url}/v1/files/{fid}"},
        }
        self.files[fid] = {**obj, "_content": content}
        return 201, obj, {}

    @staticmethod
    def _public(obj: dict) -> dict:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    def _render_prediction(self, p: dict) -> dict:
        obj = {k: v for k, v in p.items() if not k.startswith("_")}
        elapsed = time.monotonic() - p["_t0"]
        if p.get("_canceled") and elapsed < self.predict_s:
            obj["status"] = "canceled"
        elif elapsed >= self.predict_s:
            obj["status"] = "succeeded"
            obj["completed_at"] = p.setdefault("_done", _now_iso())
            obj["metrics"] = {"predict_time": self.predict_s, "total_time": round(elapsed, 3)}
            n = int(p["input"].get("num_outputs", 1))
            fmt = p["input"].get("output_format", "webp")
            seed = int(p["input"].get("seed", 0)) + int(hashlib.sha256(p["version"].encode()).hexdigest()[:6], 16)
            urls = []
            for i in range(n):
                path = f"/delivery/predictions/{p['id']}/out-{i}.{fmt}"
                self.blobs.setdefault(path, tiny_png(seed + i))
                urls.append(self.delivery_url + path)
            obj["output"] = urls
        return obj

    def _create_prediction(self, model: str, version: dict | None, body: dict, headers: Any):
        prefer = headers.get("prefer")
        if prefer is not None and not re.fullmatch(r"wait(=([1-9]|[1-9][0-9]|60))?", prefer):
            return self._problem(400, f"Invalid Prefer header {prefer!r}", "Bad request")
        if version is not None:
            schema = (version.get("openapi_schema") or {}).get("components", {}).get("schemas", {}).get("Input")
            if schema:
                invalid = self._validate(schema, body["input"], prefix="input")
                if invalid:
                    detail = "".join(f"- {f['field']}: {f['description']}\n" for f in invalid)
                    return self._problem(422, detail, "Input validation failed", invalid)
        pid = _rand_id()
        p = {
            "id": pid,
            "model": model,
            "version": version["id"] if version else "hidden",
            "input": body["input"],
            "output": None,
            "logs": "",
            "error": None,
            "status": "starting",
            "data_removed": False,
            "created_at": _now_iso(),
            "urls": {
                "get": f"{self.url}/v1/predictions/{pid}",
                "cancel": f"{self.url}/v1/predictions/{pid}/cancel",
                "web": f"https://replicate.com/p/{pid}",
            },  # fmt: skip
            "_t0": time.monotonic(),
        }
        self.predictions[pid] = p
        out_headers = {}
        if prefer:
            wait = int(prefer.split("=")[1]) if "=" in prefer else 60
            out_headers["Preference-Applied"] = f"wait={wait}"
            deadline = time.monotonic() + min(wait, self.predict_s + 0.01)
            self.lock.release()  # let other requests run while this one blocks
            try:
                while time.monotonic() < deadline:
                    time.sleep(0.005)
            finally:
                self.lock.acquire()
        obj = self._render_prediction(p)
        return (201 if obj["status"] == "succeeded" else 202), obj, out_headers


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve the Replicate stand-in on 127.0.0.1.")
    parser.add_argument("--boot-s", type=float, default=1.0)
    parser.add_argument("--train-s", type=float, default=5.0)
    args = parser.parse_args()
    stub = ReplicateStub(boot_s=args.boot_s, train_s=args.train_s).start()
    print(f"REPLICATE_BASE_URL={stub.url}\nREPLICATE_API_TOKEN={stub.token}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        stub.stop()


if __name__ == "__main__":
    main()
