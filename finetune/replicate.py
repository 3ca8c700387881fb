"""A small synchronous client for Replicate's HTTP API (httpx) and webhook signature verification.

Everything the remote backend and remote evaluation need: account, hardware, models, versions, files (streamed
multipart upload with a sha256 check), trainings, predictions (``Prefer: wait``) and the default webhook secret.
Facts come from ``reference/replicate-api.md`` and Replicate's OpenAPI spec (``replicate/openapi.json``).

Safety rules this module keeps:

* The token is read from ``REPLICATE_API_TOKEN`` (environment, else a ``.env`` file in the working directory). It is
  sent only to the configured base URL's host and Replicate's own hosts, and never appears in a message or ``repr``.
* Reads (GET/DELETE) are retried on 429, 5xx, connection errors and read timeouts with exponential backoff and jitter,
  honouring ``Retry-After`` (seconds or HTTP date) and the ``~Ns`` hint of a 429 body. Requests that create something
  are retried only when the server provably did not act on them (429, or a connection that never opened); any other
  failure after sending raises :class:`AmbiguousRequestError` so the caller can reconcile instead of paying twice.
* Every error is one :class:`ReplicateError` carrying the problem+json ``status``, ``title``, ``detail`` and
  ``invalid_fields``, with a message that says what to do.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from finetune.errors import EXIT_FAILURE, EXIT_USAGE, FinetuneError
from finetune.files import atomic_file, sha256_file, write_atomic

__all__ = [
    "DEFAULT_BASE_URL",
    "FAILED_STATUSES",
    "MAX_UPLOAD_BYTES",
    "TERMINAL_STATUSES",
    "AmbiguousRequestError",
    "Replicate",
    "ReplicateError",
    "backoff_delay",
    "load_token",
    "retry_after_seconds",
    "sign_webhook",
    "verify_webhook",
]

DEFAULT_BASE_URL = "https://api.replicate.com"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})
FAILED_STATUSES = frozenset({"failed", "canceled", "aborted"})
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # Files API limit: 413 above 100 MiB (reference §5)
# Hosts that may receive the token besides the configured base URL's host: Replicate serves files from these.
TRUSTED_SUFFIXES = ("replicate.com", "replicate.delivery")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_DELAY = 120.0  # seconds; a longer Retry-After is capped (rate limits reset within a minute)
USER_AGENT = "finetune (+httpx)"
_THROTTLE_HINT = re.compile(r"~\s*(\d+(?:\.\d+)?)\s*s")


class ReplicateError(FinetuneError):
    """An HTTP error from Replicate, parsed from its problem+json body (RFC 7807).

    ``status`` is the HTTP status (0 when no response arrived), ``title``/``detail`` the problem fields and
    ``invalid_fields`` the list of ``{"type", "field", "description"}`` a 422 carries.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        title: str = "",
        detail: str = "",
        invalid_fields: list[dict] | None = None,
        exit_code: int | None = None,
    ):
        if exit_code is None:
            exit_code = EXIT_USAGE if status in (400, 401, 402, 403, 404, 413, 422) else EXIT_FAILURE
        super().__init__(message, exit_code)
        self.status = status
        self.title = title
        self.detail = detail
        self.invalid_fields = list(invalid_fields or [])


class AmbiguousRequestError(ReplicateError):
    """A create request was sent but no answer came back: the server may or may not have acted on it."""


def _advice(status: int, method: str, path: str) -> str:
    if status == 401:
        return (
            "Set a valid token: export REPLICATE_API_TOKEN=r8_... (or put it in a .env file); "
            "create one at https://replicate.com/account/api-tokens."
        )
    if status == 402:
        return (
            "Add credit or a payment method at https://replicate.com/account/billing, wait a few minutes, then retry."
        )
    if status == 403:
        return "The token's account may not use this resource; check the owner name and the token's organisation."
    if status == 404:
        if "/trainings" in path and method == "POST":
            return "Check remote.destination (owner/name): it must be an existing model owned by the token's account."
        return "Check the owner/name, version or id: it does not exist or this account cannot see it."
    if status == 413:
        return (
            "The Files API accepts at most 100 MiB: shrink the dataset (`finetune prepare --max-side 1024`) "
            "or host the zip yourself and set dataset: https://..."
        )
    if status == 422:
        return "Fix the fields listed above and retry."
    if status == 429:
        return "Replicate is throttling this account; wait and retry."
    if status >= 500:
        return "Replicate had a server error; retry later (https://replicatestatus.com)."
    return ""


def _error_from_response(resp: httpx.Response, secret: str | None) -> ReplicateError:
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    title = str(body.get("title") or resp.reason_phrase or "")
    detail = str(body.get("detail") or "")
    invalid = body.get("invalid_fields") or []
    invalid = [f for f in invalid if isinstance(f, dict)] if isinstance(invalid, list) else []
    method, path = resp.request.method, resp.request.url.path
    lines = [f"Replicate {method} {path} failed: {resp.status_code} {title}".rstrip()]
    if invalid:
        for f in invalid:
            field = f.get("field") or "(request body)"
            lines.append(f"  - {field}: {f.get('description') or f.get('type', '')}")
    elif detail:
        lines += [f"  {line}" for line in detail.strip().splitlines()]
    advice = _advice(resp.status_code, method, path)
    if advice:
        lines.append(advice)
    message = "\n".join(lines)
    if secret:
        message = message.replace(secret, "***")
    return ReplicateError(message, status=resp.status_code, title=title, detail=detail, invalid_fields=invalid)


# ---- pure helpers ----------------------------------------------------------------------------------------------


def retry_after_seconds(headers: Mapping[str, str], body: str = "", now: float | None = None) -> float | None:
    """Seconds to wait before retrying, from ``Retry-After`` (seconds or HTTP date, RFC 9110 §10.2.3), else from the
    ``~Ns`` hint in a 429 body ("Your rate limit resets in ~30s", reference §1.3). None when neither is present."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - (time.time() if now is None else now))
    match = _THROTTLE_HINT.search(body or "")
    return float(match.group(1)) if match else None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "full jitter": uniform in [0, min(cap, base * 2**attempt)] (AWS Architecture Blog,
    "Exponential Backoff And Jitter", 2015), floored at base/2 so retries never fire back to back."""
    ceiling = min(cap, base * (2**attempt))
    return max(base / 2, (rng or random).uniform(0, ceiling))


def load_token(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> str | None:
    """``REPLICATE_API_TOKEN`` from the environment, else from a ``.env`` file in ``cwd``; None when unset."""
    env = os.environ if environ is None else environ
    token = env.get("REPLICATE_API_TOKEN", "").strip()
    if token:
        return token
    dotenv = Path(cwd or Path.cwd()) / ".env"
    if dotenv.is_file():
        for line in dotenv.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line.startswith("export "):
                line = line[len("export ") :].strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            if key.strip() == "REPLICATE_API_TOKEN":
                return value.strip().strip("'\"") or None
    return None


def sign_webhook(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``webhook-signature`` value Replicate sends: ``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body``
    keyed by the base64 part of ``whsec_…`` (Standard Webhooks; reference §6.2)."""
    key = base64.b64decode(secret.split("_", 1)[1] if secret.startswith("whsec_") else secret)
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_webhook(
    headers: Mapping[str, str], body: bytes | str, secret: str, tolerance: float | None = 300, now: float | None = None
) -> bool:
    """True when a delivery is signed with ``secret`` and its timestamp is within ``tolerance`` seconds of ``now``.

    Implements reference §6.2 exactly: the raw body is signed as received (never re-serialised); any of the
    space-separated ``v1,<sig>`` entries may match; comparison is constant-time. Replays of a valid delivery inside
    the window must be dropped by the receiver using ``webhook-id`` (see ``finetune.webhooks``).
    """
    h = {k.lower(): v for k, v in headers.items()}
    wid, ts, sigs = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    if not (wid and ts and sigs and raw and secret):
        return False
    try:
        stamp = int(ts)
    except ValueError:
        return False
    if tolerance is not None and abs((time.time() if now is None else now) - stamp) > tolerance:
        return False
    try:
        expected = sign_webhook(secret, wid, ts, raw).split(",", 1)[1]
    except (ValueError, IndexError):
        return False
    return any(hmac.compare_digest(expected, s.split(",", 1)[1]) for s in sigs.split() if "," in s)


# ---- the client --------------------------------------------------------------------------------------------------


class Replicate:
    """Synchronous Replicate API client.

    ``Replicate()`` reads the token and ``REPLICATE_BASE_URL`` (default ``https://api.replicate.com``; a value ending
    in ``/v1`` works too). ``sleep`` and ``rng`` are injectable so retry waits can be observed in tests.
    """

    def __init__(
        self,
        token: str | None = None,
        base_url: str | None = None,
        *,
        timeout: httpx.Timeout | None = None,
        max_retries: int = 6,
        retry_base: float = 0.5,
        retry_cap: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        token = token if token is not None else load_token()
        if not token:
            raise ReplicateError(
                "No Replicate API token: set REPLICATE_API_TOKEN in the environment or in a .env file in this folder "
                "(create one at https://replicate.com/account/api-tokens).",
                status=401,
                exit_code=EXIT_USAGE,
            )
        self._token = token
        base = (base_url or os.environ.get("REPLICATE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        self.base_url = base
        self._base_netloc = urlsplit(base).netloc.lower()
        self.timeout = timeout or httpx.Timeout(connect=10.0, read=30.0, write=30.0, pool=10.0)
        self.max_retries = max_retries
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._http = httpx.Client(timeout=self.timeout, headers={"User-Agent": USER_AGENT}, follow_redirects=False)

    def __repr__(self) -> str:  # never the token
        return f"Replicate(base_url={self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Replicate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        path = path_or_url if path_or_url.startswith("/v1/") else "/v1/" + path_or_url.lstrip("/")
        return self.base_url + path

    def is_trusted(self, url: str) -> bool:
        """Whether ``url`` may receive the token: the base URL's host, or a Replicate host over HTTPS."""
        parts = urlsplit(url)
        if parts.netloc.lower() == self._base_netloc:
            return True
        host = (parts.hostname or "").lower()
        return parts.scheme == "https" and any(host == s or host.endswith("." + s) for s in TRUSTED_SUFFIXES)

    def _headers(self, url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.is_trusted(url):
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***")

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        creates: bool = False,
        expect: tuple[int, ...] = (200, 201, 202, 204),
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one API request with the retry policy in the module docstring; raise ReplicateError on failure.

        ``creates=True`` marks a request that makes something (a paid job): it is retried only on 429 and on a
        connection that never opened; a failure after sending raises :class:`AmbiguousRequestError`.
        """
        url = self._url(path_or_url)
        idempotent = not creates  # reads, deletes, cancels and uploads are safe to repeat; creating a job is not
        attempt = 0
        while True:
            try:
                resp = self._http.request(
                    method,
                    url,
                    json=json_body,
                    params=params,
                    headers=self._headers(url, headers),
                    timeout=timeout or self.timeout,
                    **kwargs,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                # Nothing reached the server: safe to retry any request.
                if attempt >= self.max_retries:
                    raise ReplicateError(
                        f"Could not reach Replicate at {self.base_url} after {attempt + 1} tries: "
                        f"{self._scrub(str(e)) or type(e).__name__}. Check the network or REPLICATE_BASE_URL.",
                        exit_code=EXIT_FAILURE,
                    ) from None
                self._sleep(backoff_delay(attempt, self.retry_base, self.retry_cap, self._rng))
                attempt += 1
                continue
            except httpx.TransportError as e:
                # The request may have been received and acted on (read timeout, connection dropped mid-response).
                what = f"{type(e).__name__}: {self._scrub(str(e))}".rstrip(": ")
                if not idempotent:
                    raise AmbiguousRequestError(
                        f"Replicate {method} {urlsplit(url).path} got no answer ({what}); it may or may not have "
                        "been carried out.",
                        exit_code=EXIT_FAILURE,
                    ) from None
                if attempt >= self.max_retries:
                    raise ReplicateError(
                        f"Replicate {method} {urlsplit(url).path} failed after {attempt + 1} tries ({what}).",
                        exit_code=EXIT_FAILURE,
                    ) from None
                self._sleep(backoff_delay(attempt, self.retry_base, self.retry_cap, self._rng))
                attempt += 1
                continue
            if resp.status_code in expect:
                return resp
            retryable = resp.status_code in RETRY_STATUSES and (idempotent or resp.status_code == 429)
            if retryable and attempt < self.max_retries:
                hint = retry_after_seconds(resp.headers, resp.text)
                delay = backoff_delay(attempt, self.retry_base, self.retry_cap, self._rng) if hint is None else hint
                self._sleep(min(delay, MAX_RETRY_DELAY))
                attempt += 1
                continue
            err = _error_from_response(resp, self._token)
            if creates and resp.status_code >= 500:
                raise AmbiguousRequestError(
                    str(err), status=err.status, title=err.title, detail=err.detail, exit_code=EXIT_FAILURE
                )
            raise err

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def paginate(self, path: str, *, limit: int | None = None) -> Iterator[dict]:
        """Yield the ``results`` of a list endpoint, following ``next`` verbatim until it is null (reference §7)."""
        url: str | None = self._url(path)
        seen = 0
        while url:
            page = self._json("GET", url)
            for item in page.get("results") or []:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            url = page.get("next")

    # -- account, hardware, models, versions ------------------------------------------------------------------

    def account(self) -> dict:
        """``GET /v1/account``: ``{"type", "username", "name", ...}`` of the token's owner."""
        return self._json("GET", "account")

    def hardware(self) -> list[dict]:
        """``GET /v1/hardware``: ``[{"sku", "name"}, ...]``."""
        return self._json("GET", "hardware")

    def get_model(self, model: str) -> dict:
        """``GET /v1/models/{owner}/{name}``."""
        return self._json("GET", f"models/{model}")

    def find_model(self, model: str) -> dict | None:
        """The model, or None when it does not exist (404)."""
        try:
            return self.get_model(model)
        except ReplicateError as e:
            if e.status == 404:
                return None
            raise

    def create_model(
        self, model: str, *, hardware: str = "cpu", visibility: str = "private", description: str | None = None
    ) -> dict:
        """``POST /v1/models``: create ``owner/name`` (the owner must be the token's account)."""
        owner, name = model.split("/", 1)
        body = {"owner": owner, "name": name, "visibility": visibility, "hardware": hardware}
        if description:
            body["description"] = description
        return self._json("POST", "models", json_body=body, creates=True)

    def get_version(self, model: str, version_id: str) -> dict:
        """``GET /v1/models/{owner}/{name}/versions/{id}``: the version with its ``openapi_schema``."""
        return self._json("GET", f"models/{model}/versions/{version_id}")

    def list_versions(self, model: str) -> Iterator[dict]:
        """All versions of a model, newest first."""
        return self.paginate(f"models/{model}/versions")

    # -- files ------------------------------------------------------------------------------------------------

    def upload_file(
        self,
        path: str | Path,
        *,
        content_type: str = "application/zip",
        metadata: Mapping[str, Any] | None = None,
        sha256: str | None = None,
    ) -> dict:
        """``POST /v1/files``: stream ``path`` as multipart ``content`` (never read into memory) and check the
        response's ``checksums.sha256`` against the local file. Returns the file object (``urls.get`` is the URL to
        pass as an input). Files over 100 MiB are refused before sending."""
        path = Path(path)
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise ReplicateError(
                f"{path} is {size / 2**20:.1f} MiB; Replicate's Files API accepts at most 100 MiB. Shrink the dataset "
                "(`finetune prepare --max-side 1024`) or upload the zip yourself and set dataset: https://...",
                status=413,
                exit_code=EXIT_USAGE,
            )
        sha256 = sha256 or sha256_file(path)
        # httpx's write timeout applies per write; allow a slow uplink (256 KiB/s) for the whole file on top.
        timeout = httpx.Timeout(connect=10.0, read=120.0, write=60.0 + size / (256 * 1024), pool=10.0)
        with open(path, "rb") as f:
            files = {"content": (path.name, f, content_type)}
            data = {"filename": path.name, "type": content_type, "metadata": json.dumps(dict(metadata or {}))}
            # Not a paid job: a repeated upload only leaves a spare file that expires in 24 h, so it may be retried.
            resp = self.request("POST", "files", files=files, data=data, timeout=timeout)
        obj = resp.json()
        remote = (obj.get("checksums") or {}).get("sha256")
        if remote and remote != sha256:
            raise ReplicateError(
                f"Upload of {path} was corrupted: Replicate's sha256 {remote[:12]}… differs from the local "
                f"{sha256[:12]}…; retry the command.",
                exit_code=EXIT_FAILURE,
            )
        return obj

    def get_file(self, file_id: str) -> dict:
        """``GET /v1/files/{id}``."""
        return self._json("GET", f"files/{file_id}")

    def delete_file(self, file_id: str) -> None:
        """``DELETE /v1/files/{id}``."""
        self._json("DELETE", f"files/{file_id}")

    # -- trainings --------------------------------------------------------------------------------------------

    def create_training(
        self,
        trainer: str,
        version_id: str,
        *,
        destination: str,
        input: Mapping[str, Any],
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
    ) -> dict:
        """``POST /v1/models/{trainer}/versions/{id}/trainings``. Never retried after sending: a lost answer raises
        :class:`AmbiguousRequestError` (reconcile with :meth:`list_trainings`). Note the create response's ``urls``
        may point at ``/v1/predictions``; always poll :meth:`get_training`."""
        body: dict[str, Any] = {"destination": destination, "input": dict(input)}
        if webhook:
            body["webhook"] = webhook
            if webhook_events_filter:
                body["webhook_events_filter"] = list(webhook_events_filter)
        return self._json("POST", f"models/{trainer}/versions/{version_id}/trainings", json_body=body, creates=True)

    def get_training(self, training_id: str) -> dict:
        """``GET /v1/trainings/{id}``."""
        return self._json("GET", f"trainings/{training_id}")

    def list_trainings(self, *, limit: int | None = None) -> Iterator[dict]:
        """The account's trainings, newest first (web- and API-created)."""
        return self.paginate("trainings", limit=limit)

    def cancel_training(self, training_id: str) -> dict:
        """``POST /v1/trainings/{id}/cancel`` (safe to repeat)."""
        return self._json("POST", f"trainings/{training_id}/cancel")

    # -- predictions ------------------------------------------------------------------------------------------

    def create_prediction(
        self,
        version_or_model: str,
        input: Mapping[str, Any],
        *,
        wait: int | bool = 60,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        cancel_after: str | None = None,
    ) -> dict:
        """Start a prediction and return the prediction object.

        ``version_or_model``: ``owner/name:<version id>`` or a bare 64-hex version id (``POST /v1/predictions``), or
        ``owner/name`` of an official model (``POST /v1/models/{owner}/{name}/predictions``). ``wait`` (1-60 s, True =
        60, False = do not block) sends ``Prefer: wait=N`` so the answer may already hold the output; if the returned
        status is not terminal, poll with :meth:`wait_prediction`. Output file URLs must be fetched within an hour
        (use :meth:`download`). Not retried after sending (a lost answer raises :class:`AmbiguousRequestError`).
        """
        headers = {}
        seconds = 60 if wait is True else int(wait or 0)
        if seconds:
            seconds = max(1, min(60, seconds))
            headers["Prefer"] = f"wait={seconds}"
        if cancel_after:
            headers["Cancel-After"] = cancel_after
        body: dict[str, Any] = {"input": dict(input)}
        if webhook:
            body["webhook"] = webhook
            if webhook_events_filter:
                body["webhook_events_filter"] = list(webhook_events_filter)
        timeout = httpx.Timeout(connect=10.0, read=seconds + 10.0, write=30.0, pool=10.0)
        if ":" in version_or_model or ("/" not in version_or_model):
            body["version"] = version_or_model
            path = "predictions"
        else:
            path = f"models/{version_or_model}/predictions"
        return self._json("POST", path, json_body=body, headers=headers, timeout=timeout, creates=True)

    def get_prediction(self, prediction_id: str) -> dict:
        """``GET /v1/predictions/{id}``."""
        return self._json("GET", f"predictions/{prediction_id}")

    def cancel_prediction(self, prediction_id: str) -> dict:
        """``POST /v1/predictions/{id}/cancel``."""
        return self._json("POST", f"predictions/{prediction_id}/cancel")

    def wait_prediction(self, prediction: dict | str, *, interval: float = 1.0, timeout: float = 1800.0) -> dict:
        """Poll a prediction until its status is terminal (``aborted`` included; unknown statuses keep polling)."""
        pred = self.get_prediction(prediction) if isinstance(prediction, str) else prediction
        deadline = time.monotonic() + timeout
        while pred.get("status") not in TERMINAL_STATUSES:
            if time.monotonic() > deadline:
                raise ReplicateError(
                    f"Prediction {pred.get('id')} still {pred.get('status')} after {timeout:.0f} s.",
                    exit_code=EXIT_FAILURE,
                )
            self._sleep(interval)
            pred = self.get_prediction(pred["id"])
        return pred

    # -- webhooks, downloads ----------------------------------------------------------------------------------

    def webhook_secret(self) -> str:
        """``GET /v1/webhooks/default/secret``: the account's signing key ``whsec_…`` (keep it secret)."""
        return self._json("GET", "webhooks/default/secret")["key"]

    def download(self, url: str, dest: str | Path, *, max_bytes: int = 4 * 2**30, max_redirects: int = 5) -> Path:
        """Stream ``url`` to ``dest`` (atomically: a temp file then rename) and return ``dest``.

        Accepts ``https:``/``http:`` and ``data:`` URLs. The token is sent only to trusted hosts
        (:meth:`is_trusted`), re-checked on every redirect hop. More than ``max_bytes`` aborts the download.
        """
        dest = Path(dest)
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            return write_atomic(dest, base64.b64decode(payload) if header.endswith(";base64") else payload.encode())
        timeout = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=10.0)
        for _ in range(max_redirects + 1):
            attempt = 0
            while True:
                try:
                    with self._http.stream("GET", url, headers=self._headers(url), timeout=timeout) as resp:
                        if resp.is_redirect:
                            url = urljoin(url, resp.headers["location"])
                            break
                        if resp.status_code in RETRY_STATUSES and attempt < self.max_retries:
                            hint = retry_after_seconds(resp.headers)
                            self._sleep(hint if hint is not None else backoff_delay(attempt, self.retry_base, 30))
                            attempt += 1
                            continue
                        if resp.status_code != 200:
                            resp.read()
                            raise _error_from_response(resp, self._token)
                        written = 0
                        with atomic_file(dest) as f:  # an aborted download leaves nothing at dest
                            for chunk in resp.iter_bytes(1 << 20):
                                written += len(chunk)
                                if written > max_bytes:
                                    raise ReplicateError(
                                        f"Download of {urlsplit(url).path} exceeds {max_bytes} bytes; refusing it.",
                                        exit_code=EXIT_FAILURE,
                                    )
                                f.write(chunk)
                        return dest
                except httpx.TransportError as e:
                    if attempt >= self.max_retries:
                        raise ReplicateError(
                            f"Download of {urlsplit(url).path} failed: {type(e).__name__} {self._scrub(str(e))}",
                            exit_code=EXIT_FAILURE,
                        ) from None
                    self._sleep(backoff_delay(attempt, self.retry_base, 30, self._rng))
                    attempt += 1
        raise ReplicateError(f"Download of {url} redirected more than {max_redirects} times.", exit_code=EXIT_FAILURE)
