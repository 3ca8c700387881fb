"""A small HTTP receiver for Replicate training webhooks (``finetune webhooks serve``).

Each delivery is checked with :func:`finetune.replicate.verify_webhook` (signature and a 300 s timestamp window);
a ``webhook-id`` seen before is a replay (Replicate keeps the id across its retries) and is acknowledged but dropped.
A verified event is appended to ``events.jsonl`` in the run folder whose ``remote.json`` names the training (else to
``<runs>/webhooks-unmatched.jsonl``), and on ``succeeded`` the ``on_succeeded(training_id)`` callback runs once per
training, in a background thread so the sender gets its 2xx within a few seconds. Seen ids and imported trainings
are kept in ``<runs>/.webhooks.json`` so a restarted receiver still drops replays and never imports twice.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from finetune.files import write_atomic
from finetune.replicate import verify_webhook
from finetune.replicate_trainer import find_run_dir

__all__ = ["MAX_BODY_BYTES", "WebhookReceiver"]

MAX_BODY_BYTES = 16 * 2**20  # a training object with long logs is well under this
LEDGER = ".webhooks.json"


class WebhookReceiver:
    """Verify, de-duplicate, record and act on webhook deliveries. ``serve()`` blocks; ``start()`` runs in a thread."""

    def __init__(
        self,
        secret: str,
        *,
        runs_root: str | Path = "runs",
        on_succeeded: Callable[[str], Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tolerance: float = 300,
        log: Callable[[str], None] = print,
    ):
        if not secret:
            raise ValueError("a webhook signing secret is required")
        self._secret = secret
        self.runs_root = Path(runs_root)
        self.on_succeeded = on_succeeded
        self.tolerance = tolerance
        self.log = log
        self._lock = threading.Lock()
        self._ledger_path = self.runs_root / LEDGER
        ledger = self._load_ledger()
        self.seen: dict[str, float] = ledger.get("seen", {})
        self.imported: set[str] = set(ledger.get("imported", []))
        self.imports: list[threading.Thread] = []
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/"

    # -- persistence ----------------------------------------------------------------------------------------------

    def _load_ledger(self) -> dict:
        try:
            return json.loads(self._ledger_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _save_ledger(self) -> None:
        horizon = time.time() - 2 * self.tolerance  # older ids could only come back with an expired timestamp
        self.seen = {k: v for k, v in self.seen.items() if v >= horizon}
        write_atomic(self._ledger_path, json.dumps({"seen": self.seen, "imported": sorted(self.imported)}))

    # -- handling ---------------------------------------------------------------------------------------------------

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
        """Process one delivery; returns (HTTP status, JSON answer). Usable without the HTTP server."""
        if not verify_webhook(headers, body, self._secret, tolerance=self.tolerance):
            return 401, {"error": "invalid signature or timestamp"}
        wid = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        try:
            event = json.loads(body)
        except ValueError:
            return 400, {"error": "body is not JSON"}
        if not isinstance(event, dict) or not event.get("id"):
            return 400, {"error": "body is not a training object"}
        tid, status = str(event["id"]), event.get("status")
        with self._lock:
            if wid in self.seen:
                return 200, {"duplicate": True}
            self.seen[wid] = time.time()
            start_import = status == "succeeded" and tid not in self.imported and self.on_succeeded is not None
            if start_import:
                self.imported.add(tid)
            self._save_ledger()
        self._record(tid, wid, event)
        self.log(f"webhook {wid}: training {tid} {status}")
        if start_import:
            thread = threading.Thread(target=self._import, args=(tid,), daemon=True)
            self.imports.append(thread)
            thread.start()
        return 200, {"ok": True}

    def _record(self, tid: str, wid: str, event: dict) -> None:
        logs = [ln for ln in (event.get("logs") or "").splitlines() if ln.strip()]
        line = {
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "webhook_id": wid,
            "training_id": tid,
            "status": event.get("status"),
            "error": event.get("error"),
            "output": event.get("output"),
            "metrics": event.get("metrics"),
            "last_log_line": logs[-1] if logs else None,
        }
        run_dir = find_run_dir(tid, self.runs_root)
        path = run_dir / "events.jsonl" if run_dir else self.runs_root / "webhooks-unmatched.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def _import(self, tid: str) -> None:
        try:
            result = self.on_succeeded(tid)
            self.log(f"imported training {tid}: {getattr(result, 'ref', result)}")
        except Exception as e:  # noqa: BLE001 - a failed import must not kill the receiver; allow a later retry
            with self._lock:
                self.imported.discard(tid)
                self._save_ledger()
            self.log(f"import of training {tid} failed: {e}")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length <= 0 or length > MAX_BODY_BYTES:
                    return self._answer(413 if length else 400, {"error": "missing or oversized body"})
                body = self.rfile.read(length)
                status, obj = receiver.handle({k: v for k, v in self.headers.items()}, body)
                self._answer(status, obj)

        return Handler

    # -- running ------------------------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until interrupted."""
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._server.server_close()

    def start(self) -> WebhookReceiver:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        for thread in self.imports:
            thread.join(timeout=30)
