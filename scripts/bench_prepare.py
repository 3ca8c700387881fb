"""Benchmark `finetune prepare --max-side 1024` against a naive single-process Pillow loop (issue 2, section 5).

Generates N deterministic 4000x3000 JPEGs (every third one with an EXIF rotation), then, in the same run, times
each contender in a fresh subprocess (so both pay the same start-up and neither inherits the other's caches):

- naive: open, exif_transpose, convert("RGB"), thumbnail((1024, 1024)), save JPEG q95, write to a zip; one process.
- prepare: ``finetune.recipes.prepare.prepare(..., max_side=1024)`` with its default worker count (all cores).

Prints the median wall time of each over ``--repeats`` runs, the ratio, images/s, CPU seconds (own + children;
a figure that barely depends on how loaded the machine is), and peak memory: the peak of the
summed RSS of the whole process tree (sampled every 10 ms; shared pages count once per process, so this is an
upper bound) and the exact per-process peaks (ru_maxrss of the main process and of its largest worker). Run it for
two N to show memory is flat in N:

    python scripts/bench_prepare.py --n 100 --n 25
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageOps

SIZE = (4000, 3000)
ORIENTATIONS = (6, 1, 1, 8, 1, 1, 3, 1, 1)  # a third rotated, like a phone camera roll


def _make_one(args: tuple[int, str]) -> None:
    i, folder = args
    path = Path(folder) / f"img_{i:04d}.jpg"
    if path.exists():
        return
    rng = np.random.default_rng(i)
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(SIZE, Image.Resampling.BICUBIC)
    # Sensor-like grain (a tiled 300x400 patch) keeps the JPEG near a real 12 MP photo's 2-3 MB.
    grain = np.tile(rng.normal(0, 4, (300, 400, 1)).astype(np.int16), (SIZE[1] // 300, SIZE[0] // 400, 1))
    pixels = np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = ORIENTATIONS[i % len(ORIENTATIONS)]
    part = path.with_suffix(".part")
    Image.fromarray(pixels).save(part, "JPEG", quality=90, exif=exif.tobytes())
    os.replace(part, path)


def generate(folder: Path, n: int) -> list[Path]:
    """N deterministic photos in ``folder`` (kept between runs; image i depends only on i)."""
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make_one, [(i, str(folder)) for i in range(n)]))
    return [folder / f"img_{i:04d}.jpg" for i in range(n)]


def naive(paths: list[Path], out: Path) -> None:
    """The loop most scripts write: full decode of every pixel, one process."""
    with zipfile.ZipFile(out, "w") as zf:
        for p in paths:
            im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
            im.thumbnail((1024, 1024))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=95)
            zf.writestr(p.stem + ".jpg", buf.getvalue())
            zf.writestr(p.stem + ".txt", "a photo of TOK")


def child(kind: str, folder: Path, n: int, out: Path) -> None:
    """Runs in the measured subprocess; prints one JSON line with its own timings."""
    paths = [folder / f"img_{i:04d}.jpg" for i in range(n)]
    start = time.perf_counter()
    if kind == "naive":
        naive(paths, out)
    else:
        from finetune.recipes.prepare import prepare

        subset = out.parent / "src"
        subset.mkdir(exist_ok=True)
        for p in paths:  # prepare takes folders; link the first n generated files into one
            (subset / p.name).unlink(missing_ok=True)
            (subset / p.name).symlink_to(p)
        start = time.perf_counter()
        prepare([subset], out, "TOK", max_side=1024, progress=False, near_duplicate_distance=None)
    wall = time.perf_counter() - start
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,  # imports included
                "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def measure(kind: str, folder: Path, n: int) -> dict[str, float]:
    """One subprocess run: its own wall time plus the peak summed RSS of its process tree."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.zip"
        cmd = [sys.executable, __file__, "--child", kind, "--folder", str(folder), "--n", str(n), "--out", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.01)
        stdout = proc.stdout.read()
        if proc.returncode:
            raise SystemExit(f"{kind} run failed with exit code {proc.returncode}")
        result = json.loads(stdout.strip().splitlines()[-1])
        result["tree_peak_rss_mb"] = peak / 2**20
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="number of images (repeatable); default 100 and 25")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "finetune-bench-prepare")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=["naive", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.folder, args.n[0], args.out)

    sizes = sorted(args.n or [100, 25], reverse=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cores available: {cores}; load average before: {os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    generate(args.folder, max(sizes))
    mean_mb = statistics.mean(p.stat().st_size for p in args.folder.glob("img_*.jpg")) / 1e6
    print(
        f"{max(sizes)} images of {SIZE[0]}x{SIZE[1]} (mean {mean_mb:.1f} MB) in {args.folder}, "
        f"{time.perf_counter() - t:.0f} s"
    )
    figures = []
    for n in sizes:
        runs = {"naive": [], "prepare": []}
        for _ in range(args.repeats):  # interleaved, so a burst of load from elsewhere hits both alike
            for kind in runs:
                runs[kind].append(measure(kind, args.folder, n))
        row = {"n": n, "cores": cores}
        for kind, results in runs.items():
            wall = statistics.median(r["wall_s"] for r in results)
            row[kind] = {
                "median_wall_s": round(wall, 3),
                "walls_s": [round(r["wall_s"], 3) for r in results],
                "images_per_s": round(n / wall, 2),
                "median_cpu_s": round(statistics.median(r["cpu_s"] for r in results), 2),
                "tree_peak_rss_mb": round(max(r["tree_peak_rss_mb"] for r in results), 1),
                "main_maxrss_mb": round(max(r["self_maxrss_mb"] for r in results), 1),
                "worker_maxrss_mb": round(max(r["children_maxrss_mb"] for r in results), 1),
            }
        row["speedup"] = round(row["naive"]["median_wall_s"] / row["prepare"]["median_wall_s"], 2)
        # CPU seconds barely depend on how busy the machine is; naive CPU / (prepare CPU / cores) is the wall-time
        # speedup an otherwise idle machine would show if the pool scaled perfectly.
        row["cpu_ratio"] = round(row["naive"]["median_cpu_s"] / row["prepare"]["median_cpu_s"], 2)
        figures.append(row)
        for kind in runs:
            r = row[kind]
            print(
                f"N={n:<4} {kind:<8} median {r['median_wall_s']:7.2f} s  {r['images_per_s']:6.1f} img/s  "
                f"CPU {r['median_cpu_s']:6.1f} s  "
                f"tree peak RSS {r['tree_peak_rss_mb']:6.0f} MB  (main {r['main_maxrss_mb']:.0f} MB, "
                f"largest worker {r['worker_maxrss_mb']:.0f} MB)  runs {r['walls_s']}"
            )
        print(
            f"N={n:<4} speedup  {row['speedup']:.2f}x wall; CPU-time ratio {row['cpu_ratio']:.2f}x "
            f"(x{cores} cores = {row['cpu_ratio'] * cores:.1f}x on an idle machine with perfect scaling)"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
