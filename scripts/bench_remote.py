"""Benchmark the remote backend against the Replicate stand-in (tests/replicate_stub.py, run in a child process).

Measures the three promises of the remote mode and prints them:

1. uploading a 90 MB zip raises this process's peak RSS by less than 50 MB (the multipart body streams from disk);
2. while following a training, at most one status request per 2 s on average (default poll intervals);
3. registration starts within 1 s of seeing ``succeeded`` (not counting the weights download).

    python scripts/bench_remote.py [--upload-mb 90] [--boot-s 3] [--train-s 12]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def start_stub(boot_s: float, train_s: float) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "replicate_stub.py"),
            "--boot-s",
            str(boot_s),
            "--train-s",
            str(train_s),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    env = dict(proc.stdout.readline().strip().split("=", 1) for _ in range(2))
    return proc, env["REPLICATE_BASE_URL"], env["REPLICATE_API_TOKEN"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upload-mb", type=int, default=90)
    parser.add_argument("--boot-s", type=float, default=3.0)
    parser.add_argument("--train-s", type=float, default=12.0)
    args = parser.parse_args()

    from finetune.config import load_config
    from finetune.recipes import train_remote as recipe
    from finetune.replicate import Replicate

    class CountingReplicate(Replicate):
        polls = 0

        def get_training(self, training_id: str) -> dict:
            self.polls += 1
            return super().get_training(training_id)

    proc, url, token = start_stub(args.boot_s, args.train_s)
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    os.chdir(work)
    os.environ.update(FINETUNE_HOME=str(work / "home"), REPLICATE_API_TOKEN=token, REPLICATE_BASE_URL=url)
    try:
        client = CountingReplicate()
        # 1. Upload RSS: warm up with a small upload so imports and buffers count in the baseline.
        small = work / "small.zip"
        small.write_bytes(os.urandom(1 << 20))
        client.upload_file(small)
        big = work / "big.zip"
        with open(big, "wb") as f:
            for _ in range(args.upload_mb):
                f.write(os.urandom(1 << 20))
        before = peak_rss_mb()
        t0 = time.perf_counter()
        client.upload_file(big)
        upload_s = time.perf_counter() - t0
        rss_delta = peak_rss_mb() - before
        big.unlink()

        # 2 + 3. A whole training with the default poll intervals.
        data = work / "data.zip"
        with zipfile.ZipFile(data, "w") as zf:
            zf.writestr("a.png", b"\x89PNG fake")
            zf.writestr("a.txt", "a photo of TOK")
        cfg = load_config(None, [f"dataset={data}", "backend=replicate", "output=me/bench"])
        t0 = time.perf_counter()
        version = recipe.train_remote(cfg, client=client)
        wall = time.perf_counter() - t0
        state = recipe._read_state(next((work / "runs").iterdir()))
        overhead = state["timings"]["import_overhead_s"]
        follow_s = args.boot_s + args.train_s
    finally:
        proc.terminate()
        proc.wait()

    print(f"poll intervals: POLL_INTERVAL={recipe.POLL_INTERVAL} s, POLL_MAX_INTERVAL={recipe.POLL_MAX_INTERVAL} s")
    print(f"upload {args.upload_mb} MB: {upload_s:.2f} s, peak RSS +{rss_delta:.1f} MB (promise: < 50 MB)")
    print(
        f"following {follow_s:.0f} s of training: {client.polls} status requests = "
        f"{client.polls / follow_s:.2f}/s, one per {follow_s / max(client.polls, 1):.1f} s (promise: <= 1 per 2 s)"
    )
    print(f"succeeded -> registration start: {overhead * 1000:.1f} ms excluding download (promise: < 1 s)")
    print(f"whole remote run: {wall:.1f} s -> {version.ref}")
    ok = rss_delta < 50 and client.polls / follow_s <= 0.5 and overhead < 1.0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
