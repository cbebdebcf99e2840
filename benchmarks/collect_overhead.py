"""What frame collection (collect.enabled) costs a station: edge-run on the same clip with collection off and on,
in alternating rounds, frames/s from its start-up line to its last frame.

    python benchmarks/collect_overhead.py [--engine engines/patchcore] [--data demo-out/data] [--rounds 3]

The clip (lossless FFV1, 10 fps) is made of the data folder's images: its train/good images in turn, with two
stretches of its first test/<defect> images, so a bundle trained on that folder (`make demo` makes both) sees
normal parts and events. Collection runs at a rate far above the default (a normal frame every `--every` s of
frame time, default 1 s: every 10th frame, against one a minute by default) so that its cost shows. Prints one
table, and what was written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    if img is None:
        raise SystemExit(f"{path}: cannot read this image")
    return img


def write_clip(path: Path, data: Path, frames: int, defects: list[tuple[int, int]]) -> None:
    """Good images in turn, defect images inside the ``defects`` stretches (all at the first image's size)."""
    good = sorted((data / "train" / "good").glob("*.png"))
    bad_dir = next(d for d in sorted((data / "test").iterdir()) if d.name != "good")
    bad = sorted(bad_dir.glob("*.png"))
    first = read(good[0])
    h, w = first.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"FFV1"), 10.0, (w, h))
    for i in range(frames):
        pool = bad if any(a <= i < b for a, b in defects) else good
        img = read(pool[i % len(pool)])
        writer.write(cv2.resize(img, (w, h)) if img.shape[:2] != (h, w) else img)
    writer.release()


def run(engine: str, clip: Path, work: Path, collect: bool, every: float) -> tuple[float, int, int]:
    """frames/s after start-up, normal frames and event frames written."""
    cfg = work / "station.yaml"
    cdir = work / "collect"
    cfg.write_text(f"station: bench\nstate_dir: {work / 'state'}\nmqtt:\n  url: mqtt://127.0.0.1:1\n"
                   f"  flush_timeout_s: 0\ncollect:\n  enabled: {'true' if collect else 'false'}\n  dir: {cdir}\n"
                   f"  normal_every_s: {every}\n  guard_s: 2\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from edge.cli import run_main; sys.exit(run_main())",
                             "--config", str(cfg), "--camera", str(clip), "--engine", engine],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stderr is not None
    started = ended = None
    frames = 0
    for line in proc.stderr:
        if "station 'bench'" in line:
            started = time.monotonic()
        elif "stopped after" in line:
            ended = time.monotonic()
            frames = int(line.split("stopped after")[1].split()[0])
    proc.wait()
    if started is None or ended is None:
        raise SystemExit(f"edge-run did not run through (exit {proc.returncode})")
    normals = len(list((cdir / "train" / "good").glob("*.png"))) if collect else 0
    events = len(list((cdir / "events").glob("*/*.png"))) if collect else 0
    return frames / (ended - started), normals, events


def inference_thread_cost(data: Path, frames: int, every: float) -> tuple[float, float, float, int]:
    """In one process: µs per frame the station's thread spends in Collection.on_frame (what collection adds to
    inference; the frames it hands over are not written here), and the writer thread's wall and CPU ms per PNG
    frame (encode, fsync, rename) at the images' size; its wall time is long on a busy machine (it runs niced)."""
    sys.path.insert(0, str(ROOT))
    from core.events import EventDetector, EventRule
    from edge.collect import Collection
    from edge.config import CollectConfig
    from edge.frame_writer import NormalJob, Shot
    from edge.sources import Frame

    good = [read(p) for p in sorted((data / "train" / "good").glob("*.png"))[:20]]
    with tempfile.TemporaryDirectory(prefix="collect-cost-") as tmp:
        cfg = CollectConfig(enabled=True, normal_every_s=every, guard_s=2.0, queue_frames=10_000)
        col = Collection(cfg, Path(tmp) / "c", "bench", ["cam0"], window_n=5)
        col.set_model("m", "v", 1.0)
        det = EventDetector(EventRule(threshold=1.0))
        spent = 0.0
        for i in range(frames):
            img = good[i % len(good)]
            f = Frame("cam0", i, 1_790_000_000.0 + i / 10.0, img[:16, :16].copy(), original=img)
            score = 2.0 if frames // 2 <= i < frames // 2 + 20 else 0.5
            ts = det.feed(i, f.ts, score)
            t0 = time.perf_counter()
            col.on_frame("cam0", f, score, det, ts)
            for t in ts:
                if t.type == "end":
                    col.on_event_end("cam0", t)
            spent += time.perf_counter() - t0
        handed = col.writer.counts["dropped"] + len(col.writer._jobs)  # not written: only the station's side here
        n = 40
        writer = Collection(cfg, Path(tmp) / "w", "bench", ["cam0"], window_n=5).writer
        for i in range(n):
            img = good[i % len(good)]
            writer.submit(NormalJob(Shot(Frame("cam0", i, 1_790_000_000.0 + i, img, original=img), 0.5, 1.0, "m", "v")))
        t0, c0 = time.perf_counter(), time.process_time()
        writer.start()
        writer.close(120)
        wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
        return spent / frames * 1e6, wall * 1e3, cpu * 1e3, handed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default=str(ROOT / "engines" / "patchcore"))
    ap.add_argument("--data", default=str(ROOT / "demo-out" / "data"), help="MVTec-layout folder of the bundle")
    ap.add_argument("--rounds", type=int, default=3, help="alternating edge-run rounds (0: only the costs)")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--every", type=float, default=1.0, help="collect.normal_every_s of the 'on' runs")
    args = ap.parse_args()
    if args.rounds:
        with tempfile.TemporaryDirectory(prefix="collect-bench-") as tmp:
            work = Path(tmp)
            clip = work / "clip.avi"
            quarter = args.frames // 4
            write_clip(clip, Path(args.data), args.frames, [(quarter, quarter + 20), (2 * quarter, 2 * quarter + 20)])
            rates: dict[bool, list[float]] = {False: [], True: []}
            written = (0, 0)
            for r in range(args.rounds):
                for collect in ((False, True) if r % 2 == 0 else (True, False)):
                    rundir = work / f"r{r}-{int(collect)}"
                    rundir.mkdir()
                    fps, normals, events = run(args.engine, clip, rundir, collect, args.every)
                    rates[collect].append(fps)
                    if collect:
                        written = (normals, events)
        print("| collection | frames/s by round | median |")
        print("|---|---|---|")
        for collect in (False, True):
            print(f"| {'on' if collect else 'off'} | {' / '.join(f'{x:.1f}' for x in rates[collect])} | "
                  f"{statistics.median(rates[collect]):.1f} |")
        print(f"\n'on' wrote {written[0]} normal frames and {written[1]} event frames per run "
              f"({args.frames} frames, normal_every_s {args.every:g})\n")
    us, wall, cpu, handed = inference_thread_cost(Path(args.data), 5000, args.every)
    print(f"station thread: {us:.1f} us per frame in Collection.on_frame (5000 frames, {handed} handed over); "
          f"writer thread: {wall:.1f} ms wall, {cpu:.1f} ms CPU per PNG frame written (encode + fsync + rename)")


if __name__ == "__main__":
    main()
