"""edge-run's pipeline on generated video against its own backend's ceiling and a hand-written loop, one run.

    python benchmarks/pipeline.py [--models patchcore] [--rounds 5] [--frames 600] [--cameras 1,2,4,8]
                                  [--batches 1,4,8,16] [--stream-seconds 10] [--json]
    python benchmarks/pipeline.py --live [--viewers 1,3] [--models patchcore] [--rounds 5] [--frames 600] [--json]

First, before anything else runs, `make demo`'s fit is timed (``edge-train fit`` on the demo's parts, a process
of its own). Then, in one process, per model (fitted here on generated parts with the defaults of
config/train.yaml), on one generated 640x480 clip (parts with planted defects, MJPG like a USB camera), a real
Mosquitto started here:
- **raw**: the station's backend on the same graph (the score-only one: snapshots are off) and the same frames
  already decoded and resized, in memory, at batch 1, 2, 4, 8, 16, the sizes timed in turns, half of each
  round's turns before its edge-run and half after (so a drift of the VM's speed hits both alike): the ceiling;
- **edge-run**: the station's pipeline (capture thread, decode, resize, batcher, backend, events, spool, MQTT),
  built exactly as `edge-run --camera CLIP` builds it, reading the file as fast as it decodes: frames/s in
  steady state (first scored batch to last, as raw is timed warm; start-up is its own column) and over the
  whole run, efficiency (steady ÷ the best raw of the same round), capture-to-decision latency, CPU, peak
  resident memory, start-up to the first scored frame, and seconds per stage (decode and resize run on the
  capture thread, queue wait / inference / events / spool on the main thread, publish on the sender thread);
- **naive**: a loop a user would write: read a frame with OpenCV, resize it, to a torch tensor, run the torch
  module eagerly, one frame at a time.
The three are measured in alternating rounds (raw, edge-run, naive, raw; raw, naive, edge-run, raw; ...):
machines here are noisy, so each ratio comes from one round and the table shows every round and the median;
"vs naive" compares the whole edge-run, start and shutdown included, with the naive loop.
Then, so a user can size a station: edge-run on 1, 2, 4, 8 cameras that each deliver 30 frames/s (the clip
replayed live, `max_fps: 30`), and at fixed batch sizes (`auto_batch: false`).

``--live`` measures the live page's cost instead (edge/live.py): edge-run on the same clip, read as fast as it
decodes, in settings taken in turns each round (the order rotates): the page off (the score-only graph); on with
nobody looking (the full graph, frames kept at camera resolution); on with 1, 3 (``--viewers``) pages open, each
holding the camera's MJPEG stream and reading the status every second as the page does; and on with a client
polling status and frame without pause (the worst case: requests back to back; the page draws a frame at most
twice a refresh_s). Each viewer is a process of its own, as a browser is. Steady frames/s and CPU of each, its
ratio to the page off, per round and the median, the frames the page drew and the MJPEG streams held as the run started;
and, to tell the graph's share apart, the backend alone on the
score-only and the full graph (batch 8, frames in memory, in turns between the rounds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edge_helpers import Mosquitto, free_port, mosquitto_binary  # noqa: E402

from core.bundle import load_bundle  # noqa: E402
from core.preprocess import resize_frame  # noqa: E402
from edge.backends import create_backend  # noqa: E402

CAMERA_FPS = 30.0


def fit(work: Path, model_name: str, epochs: Optional[int]) -> tuple[Path, Any]:
    """A bundle of ``model_name`` (what the station runs) and the torch module it was exported from (what the
    naive loop runs): the same weights."""
    import torch

    from trainer.config import load_train_config
    from trainer.pipeline import fit_bundle
    from trainer.synthetic import make_dataset

    data = make_dataset(work / f"data-{model_name}", n_train=50, n_test_good=0, n_test_defect=0, size=160, seed=0)
    cfg = load_train_config(None)
    cfg.model = model_name
    if epochs is not None:
        cfg.epochs = epochs
    modules: list[Any] = []
    bundle = fit_bundle(cfg, data, work / "engines", log=lambda _m: None, on_export=modules.append)
    torch.set_num_threads(2)
    return bundle, modules[0].eval()


def demo_fit_seconds(work: Path) -> float:
    """Wall time of `make demo`'s training step: ``edge-train fit`` on the demo's parts, process start-up
    included, as the demo runs it."""
    import subprocess

    from trainer.synthetic import make_demo_dataset

    data = make_demo_dataset(work / "demo-data")
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "edge-train"), "fit", "--data", str(data),
                           "--out", str(work / "demo-engines")], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"pipeline: error: the demo's fit failed: {last}")
    return time.perf_counter() - t0


class RawCeiling:
    """The station's backend at each batch size on frames already in memory (the ceiling): one session per size
    with the station's session options, on the graph edge-run runs without snapshots (the score-only one).

    Sizes are timed in turns of ``SLICE_S`` each (b1, b2, ..., b1, b2, ...) and half the turns run before the
    edge-run of the round, half after: this VM's speed drifts by tens of percent within a minute, and a size or
    a path timed alone in a fast or slow moment would be compared with the others at another moment."""

    SLICE_S = 0.2

    def __init__(self, bundle_dir: Path, frames: np.ndarray, batches: list[int], threads: int,
                 spinning: bool, need_map: bool = False) -> None:
        bundle = load_bundle(bundle_dir)
        self.frames = frames
        self.backends = {b: create_backend("onnxruntime", bundle, max_batch=b, intra_op_threads=threads,
                                           spinning=spinning, need_map=need_map) for b in batches}
        self.done = dict.fromkeys(batches, 0)
        self.seconds = dict.fromkeys(batches, 0.0)
        for b, backend in self.backends.items():
            backend.infer(frames[:b])  # warm-up: allocations for this shape

    def run(self, seconds_each: float) -> None:
        """About ``seconds_each`` more at every size, in turns."""
        for _ in range(max(1, round(seconds_each / self.SLICE_S))):
            for b, backend in self.backends.items():
                n = 0
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < self.SLICE_S:
                    start = ((self.done[b] // b + n) * b) % (len(self.frames) - b)
                    backend.infer(self.frames[start:start + b])
                    n += 1
                self.seconds[b] += time.perf_counter() - t0
                self.done[b] += n * b

    def rates(self) -> dict[int, float]:
        return {b: self.done[b] / self.seconds[b] for b in self.backends}

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()


def naive(clip: Path, module: Any, hw: tuple[int, int], limit: int) -> float:
    import torch

    cap = cv2.VideoCapture(str(clip))
    n = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while n < limit:
            ok, img = cap.read()
            if not ok:
                break
            x = torch.from_numpy(np.ascontiguousarray(cv2.resize(img, (hw[1], hw[0]))))[None]
            module(x)
            n += 1
    cap.release()
    return n / (time.perf_counter() - t0)


def edge_run(clip: Path, bundle_dir: Path, work: Path, broker_url: str, threads: int, spinning: bool,
             cameras: int = 1,
             live_fps: Optional[float] = None, max_frames: Optional[int] = None,
             batch: Optional[int] = None, live_page: bool = False,
             viewers: Optional[tuple[str, int]] = None) -> dict[str, Any]:
    """The station exactly as edge-run builds it (edge.cli), run in this process so its clocks can be read.
    ``cameras`` copies of the clip, one camera each; ``live_fps``: each replayed live at that rate (a camera);
    ``batch``: a fixed batch size instead of the automatic choice; ``live_page``: the live page on (a free port);
    ``viewers``: (mode, count) of Viewer processes on the page meanwhile."""
    from edge.cli import build_from_args, run_parser

    name = f"bench{cameras}{'live' if live_fps else ''}{batch or ''}{'page' if live_page else ''}"
    cams = "".join(f"  - {{id: cam{i}, source: '{clip}'" + (f", live: true, max_fps: {live_fps}" if live_fps else "")
                   + "}\n" for i in range(cameras))
    engine = f"intra_op_threads: {threads}, intra_op_spinning: {str(spinning).lower()}"
    if batch:
        engine += f", auto_batch: false, max_batch: {batch}"
    cfg_path = work / f"{name}.yaml"
    port = free_port() if live_page else 0
    cfg_path.write_text(f"station: {name}\nstate_dir: {work / 'state'}\nmqtt: {{stats_interval_s: 1}}\n"
                        f"engine: {{{engine}}}\nlive: {{port: {port}}}\ncameras:\n{cams}")
    argv = ["--config", str(cfg_path), "--engine", str(bundle_dir), "--mqtt", broker_url, "--log-level", "WARNING"]
    if max_frames:
        argv += ["--max-frames", str(max_frames)]
    t_start = time.monotonic()
    station = build_from_args(run_parser().parse_args(argv))
    for sink in station.sinks:
        sink.start()
        sink.wait_first_attempt(5.0)
    running = [Viewer(port, viewers[0]) for _ in range(viewers[1])] if live_page and viewers else []
    if running and viewers is not None:
        Viewer.wait_connected(station, viewers)
    streams = station.live.streams if station.live is not None else 0  # MJPEG streams held as the run starts
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = station.run()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for viewer in running:
        viewer.stop()
    drawn = None
    if station.live is not None:
        drawn = station.live.drawn if running else None
        station.live.close()
    for sink in station.sinks:
        sink.stop()
    station.backend.close()
    station.outbox.close()
    lat50, lat99 = station.stats.latency_ms.percentiles(50, 99)
    stages = station.clock.snapshot()
    stages["publish"] = sum(float(getattr(sink, "publish_seconds", 0.0)) for sink in station.sinks)
    first, last = station.first_scored_at, station.last_scored_at
    steady = (result.frames - station.first_batch_frames) / (last - first) if first and last and last > first \
        else None
    return {"frames": result.frames, "seconds": wall, "fps": result.frames / wall, "steady_fps": steady,
            "batch": station.batch.size,
            "startup_to_first_score_s": None if first is None else first - t_start,
            "latency_p50_ms": lat50, "latency_p99_ms": lat99,
            "dropped": sum(c.source.queue.dropped for c in station.cameras.values()),
            "cpu_percent": 100.0 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / wall,
            "max_rss_mb": ru1.ru_maxrss / 1024.0, "stages_s": stages, "events": result.events,
            "page_frames": drawn, "streams": streams,
            "graph": Path(str(getattr(station.backend, "path", ""))).name}


class Viewer:
    """A browser on the live page, in a process of its own as a browser is. ``mjpeg``: the page open (the camera's
    MJPEG stream held and read, the status every second); ``flood``: status and, when a newer frame was scored,
    the frame, requested back to back."""

    SCRIPT = """
import json, signal, sys, threading, time, urllib.request
url, mode = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
def status():
    return json.loads(urllib.request.urlopen(url + "/api/status", timeout=10).read())["cameras"]
def stream(camera):
    with urllib.request.urlopen(url + "/cam/" + camera + ".mjpg", timeout=60) as resp:
        while resp.read(65536):
            pass
try:
    cams = status()
    if mode == "mjpeg":
        threading.Thread(target=stream, args=(cams[0]["id"],), daemon=True).start()
    shown = None
    while True:
        cams = status()
        if mode == "flood" and cams[0]["frame"] is not None and cams[0]["frame"] != shown:
            shown = cams[0]["frame"]
            urllib.request.urlopen(url + "/cam/" + cams[0]["id"] + ".jpg", timeout=10).read()
        time.sleep(1.0 if mode == "mjpeg" else 0.0)
except OSError:
    pass  # the station stopped (its page with it)
"""

    def __init__(self, port: int, mode: str) -> None:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, f"http://127.0.0.1:{port}", mode])

    @staticmethod
    def wait_connected(station: Any, viewers: tuple[str, int], timeout_s: float = 30.0) -> None:
        """Until every MJPEG viewer holds its stream (their start-up is no part of the run measured)."""
        deadline = time.monotonic() + timeout_s
        while viewers[0] == "mjpeg" and station.live.streams < viewers[1] and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def live_settings(counts: list[int]) -> dict[str, tuple[bool, Optional[tuple[str, int]]]]:
    """Setting name -> (page on, (viewer mode, count))."""
    settings: dict[str, tuple[bool, Optional[tuple[str, int]]]] = {"off": (False, None),
                                                                   "on, nobody looking": (True, None)}
    for n in counts:
        settings[f"{n} page{'s' if n > 1 else ''} open (MJPEG)"] = (True, ("mjpeg", n))
    settings["polled without pause"] = (True, ("flood", 1))
    return settings


def clip_and_inputs(model_name: str, bundle_dir: Path, args: argparse.Namespace,
                    work: Path) -> tuple[Any, Path, np.ndarray]:
    """The fitted bundle, the generated clip every path reads (``--size``, ``--frames``, ``--codec``, one defect
    stretch) and its frames fitted to the model, in memory for the raw backend."""
    from trainer.synthetic import write_clip

    w, h = (int(v) for v in args.size.split("x"))
    clip = write_clip(work / f"line-{model_name}.avi", (h, w), args.frames,
                      [(args.frames // 5, args.frames // 5 + 30)], fps=CAMERA_FPS, seed=3, codec=args.codec)
    return load_bundle(bundle_dir), clip, model_inputs(clip, bundle_dir)


def measure_live(model_name: str, args: argparse.Namespace, work: Path, broker_url: str) -> dict[str, Any]:
    """``--live``: the live page's cost on edge-run's frames/s (see the module docstring)."""
    bundle_dir, _ = fit(work, model_name, args.epochs)
    bundle, clip, frames = clip_and_inputs(model_name, bundle_dir, args, work)
    graphs = {need_map: RawCeiling(bundle_dir, frames, [8], args.threads, args.spinning, need_map=need_map)
              for need_map in (False, True)}
    settings = live_settings(args.viewers)
    names = list(settings)
    rounds = []
    for i in range(args.rounds):
        for _ in range(max(1, round(args.seconds / RawCeiling.SLICE_S / 2))):  # the two graphs in turns
            for ceiling in graphs.values():
                ceiling.run(RawCeiling.SLICE_S)
        order = names[i % len(names):] + names[:i % len(names)]  # each setting goes first in turn
        runs = {}
        for name in order:
            page, viewers = settings[name]
            runs[name] = edge_run(clip, bundle_dir, work, broker_url, args.threads, args.spinning, live_page=page,
                                  viewers=viewers)
        rounds.append({name: runs[name] for name in names})
    ratios = {name: statistics.median(r[name]["steady_fps"] / r["off"]["steady_fps"] for r in rounds)
              for name in names}
    raw = {"score-only graph": graphs[False].rates()[8], "full graph": graphs[True].rates()[8]}
    for ceiling in graphs.values():
        ceiling.close()
    return {"model": f"{bundle.model_name} {bundle.input_hw[0]}x{bundle.input_hw[1]}",
            "clip": f"{args.size} {args.codec}", "frames": args.frames, "rounds": rounds, "median_ratio": ratios,
            "raw_b8_fps": raw}


def print_live(result: dict[str, Any]) -> None:
    print(f"\n== live page: {result['model']} on a {result['clip']} clip of {result['frames']} frames, "
          f"{result['machine_cores']} cores; edge-run steady frames/s, CPU % (frames the page drew, MJPEG streams "
          "held as the run started) ==")
    print("graphs run: " + ", ".join(f"{n}: {r['graph']}" for n, r in result["rounds"][0].items()))
    names = list(result["rounds"][0])
    print("round  " + "".join(f"{n:<26}" for n in names))
    for i, r in enumerate(result["rounds"]):
        cells = [f"{r[n]['steady_fps']:.1f}, {r[n]['cpu_percent']:.0f} %"
                 + ("" if r[n]["page_frames"] is None else f" ({r[n]['page_frames']}, {r[n]['streams']})")
                 for n in names]
        print(f"{i:<7}" + "".join(f"{c:<26}" for c in cells))
    print("median ratio to off: " + ", ".join(f"{n} {v:.3f}" for n, v in result["median_ratio"].items()))
    raw = result["raw_b8_fps"]
    print(f"the backend alone at batch 8 on frames in memory (the two graphs in turns): score-only "
          f"{raw['score-only graph']:.1f} frames/s, full graph (the map, with the page on) {raw['full graph']:.1f} "
          f"({raw['full graph'] / raw['score-only graph']:.3f}x)")


def measure_model(model_name: str, args: argparse.Namespace, work: Path, broker_url: str) -> dict[str, Any]:
    """Every table for one model; see the module docstring."""
    bundle_dir, module = fit(work, model_name, args.epochs)
    bundle, clip, frames = clip_and_inputs(model_name, bundle_dir, args, work)
    batches = [b for b in args.batches_raw if b <= (bundle.max_batch or 1 << 30)]
    rounds = []
    for i in range(args.rounds):
        ceiling = RawCeiling(bundle_dir, frames, batches, args.threads, args.spinning)
        ceiling.run(args.seconds / 2)
        if i % 2:  # edge-run and naive side by side, in turns first: each ratio compares one moment
            base = naive(clip, module, bundle.input_hw, min(args.frames, 300))
        station = edge_run(clip, bundle_dir, work, broker_url, args.threads, args.spinning)
        if not i % 2:
            base = naive(clip, module, bundle.input_hw, min(args.frames, 300))
        ceiling.run(args.seconds / 2)
        raw = ceiling.rates()
        ceiling.close()
        best = max(raw.values())
        rounds.append({"raw_fps_by_batch": raw, "raw_best_fps": best, "edge_run": station,
                       "efficiency": station["steady_fps"] / best, "naive_fps": base,
                       "vs_naive": station["fps"] / base,
                       "batch8_vs_batch1_cost": raw[1] / raw[8] if 1 in raw and 8 in raw else None})
    stream = {c: edge_run(clip, bundle_dir, work, broker_url, args.threads, args.spinning, cameras=c,
                          live_fps=CAMERA_FPS, max_frames=int(args.stream_seconds * CAMERA_FPS)) for c in args.cameras}
    fixed = fixed_batches(clip, bundle_dir, frames, work, broker_url, args,
                          [b for b in args.batches if b <= (bundle.max_batch or 1 << 30)])

    def med(key: str) -> Optional[float]:
        values = [r[key] for r in rounds if r[key] is not None]
        return statistics.median(values) if values else None

    return {"model": f"{bundle.model_name} {bundle.input_hw[0]}x{bundle.input_hw[1]}",
            "clip": f"{args.size} {args.codec}",
            "frames": len(frames), "rounds": rounds, "median_efficiency": med("efficiency"),
            "median_vs_naive": med("vs_naive"), "median_batch8_vs_batch1_cost": med("batch8_vs_batch1_cost"),
            "cameras_30fps": stream, "fixed_batch": fixed}


def fixed_batches(clip: Path, bundle_dir: Path, frames: np.ndarray, work: Path, broker_url: str,
                  args: argparse.Namespace, batches: list[int]) -> dict[int, dict[str, Any]]:
    """edge-run at each fixed batch size (``auto_batch: false``) against its backend at the same size, in
    ``--fixed-rounds`` rounds: each round times the backend at b half before and half after edge-run at b, so each
    ratio compares one moment (this VM's speed swings by tens of percent within a minute). Per size: the last
    round's edge-run figures, the rounds' ratios and their median."""
    out: dict[int, dict[str, Any]] = {}
    for _ in range(args.fixed_rounds):
        for b in batches:
            ceiling = RawCeiling(bundle_dir, frames, [b], args.threads, args.spinning)
            ceiling.run(args.seconds / 2)
            station = edge_run(clip, bundle_dir, work, broker_url, args.threads, args.spinning, batch=b)
            ceiling.run(args.seconds / 2)
            raw = ceiling.rates()[b]
            ceiling.close()
            row = out.setdefault(b, {"ratios": [], "raw_fps": []})
            row.update(station)
            row["ratios"].append(station["steady_fps"] / raw)
            row["raw_fps"].append(raw)
    for row in out.values():
        row["median_ratio"] = statistics.median(row["ratios"])
    return out


def model_inputs(clip: Path, bundle_dir: Path) -> np.ndarray:
    """The clip's frames decoded and fitted to the bundle's input, in memory (what the raw backend is timed on)."""
    bundle = load_bundle(bundle_dir)
    cap = cv2.VideoCapture(str(clip))
    decoded = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        decoded.append(resize_frame(img, bundle.input_hw, bundle.input_resize))
    cap.release()
    return np.stack(decoded)


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def print_tables(result: dict[str, Any]) -> None:
    print(f"\n== {result['model']} on a {result['clip']} clip of {result['frames']} frames, "
          f"{result['machine_cores']} cores ==")
    batches = list(result["rounds"][0]["raw_fps_by_batch"])
    print("round  " + "".join(f"raw b{b:<5}" for b in batches) + "edge-run  (whole)  batch  efficiency  naive  "
          "vs naive  p50 ms  p99 ms  CPU %  RSS MB  start s")
    for i, r in enumerate(result["rounds"]):
        e = r["edge_run"]
        naive_fps, vs = f"{r['naive_fps']:.1f}", f"{r['vs_naive']:.2f}x"
        print(f"{i:<7}" + "".join(f"{r['raw_fps_by_batch'][b]:<9.1f}" for b in batches)
              + f"{e['steady_fps']:<10.1f}{e['fps']:<9.1f}{e['batch']:<7}{r['efficiency']:<12.2f}{naive_fps:<7}{vs:<10}"
              f"{e['latency_p50_ms']:<8}{e['latency_p99_ms']:<8}{e['cpu_percent']:<7.0f}{e['max_rss_mb']:<8.0f}"
              f"{e['startup_to_first_score_s']:.2f}")
    b8 = result["median_batch8_vs_batch1_cost"]
    print(f"median over rounds: efficiency {result['median_efficiency']:.2f} of the best raw batch size, "
          + f"{result['median_vs_naive']:.2f}x naive, "
          + ("" if b8 is None else f"per-frame cost at batch 8 = {b8:.2f}x batch 1's"))
    last = result["rounds"][-1]["edge_run"]
    print(f"seconds per stage, last round ({last['seconds']:.2f} s wall; stages on other threads overlap): "
          + ", ".join(f"{k} {v:.3f}" for k, v in last["stages_s"].items()))
    print(f"cameras at {CAMERA_FPS:.0f} frames/s each (the clip replayed live): cameras, frames/s in all, dropped, "
          "batch, latency p50 / p99 ms, CPU %")
    for c, r in result["cameras_30fps"].items():
        print(f"  {c:>3}  {r['fps']:8.1f}  {r['dropped']:>6}  {r['batch']:>3}  {r['latency_p50_ms']} / "
              f"{r['latency_p99_ms']}  {r['cpu_percent']:.0f}")
    print("fixed batch size (auto_batch: false; the clip read as fast as it decodes) against the backend at that size "
          "in the same rounds: batch, edge-run frames/s (steady, last round), raw frames/s (last round), edge-run / "
          "raw per round and median, latency p50 / p99 ms")
    for b, r in result["fixed_batch"].items():
        per_round = " ".join(f"{v:.2f}" for v in r["ratios"])
        print(f"  {b:>3}  {r['steady_fps']:8.1f}  {r['raw_fps'][-1]:8.1f}  {per_round} ({r['median_ratio']:.2f})  "
              f"{r['latency_p50_ms']} / {r['latency_p99_ms']}")


def counts(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="patchcore", help="comma-separated registered models (default patchcore)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs for models trained by epochs (speed does not "
                                                             "depend on it; default: the model's)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating raw / edge-run / naive rounds (default 5)")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--size", default="640x480", help="clip frame size WxH (default 640x480)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per raw batch size and round (default 2)")
    ap.add_argument("--codec", default="MJPG", help="clip codec: MJPG (what USB cameras send, default) or FFV1")
    ap.add_argument("--threads", type=int, default=0, help="engine.intra_op_threads (0 = the station's default)")
    ap.add_argument("--cameras", default="1,2,4,8", help="camera counts at 30 frames/s each (default 1,2,4,8)")
    ap.add_argument("--stream-seconds", type=float, default=10.0, help="seconds per camera-count row (default 10)")
    ap.add_argument("--batches", default="1,4,8,16", help="fixed batch sizes for edge-run (default 1,4,8,16)")
    ap.add_argument("--fixed-rounds", type=int, default=3,
                    help="rounds of edge-run against the backend at each fixed batch size (default 3)")
    ap.add_argument("--spinning", action="store_true", help="engine.intra_op_spinning: true (default false), "
                                                            "raw backend included")
    ap.add_argument("--no-demo-fit", action="store_true", help="skip timing `make demo`'s fit (edge-train fit "
                                                               "on the demo's 60 parts)")
    ap.add_argument("--live", action="store_true", help="measure the live page's cost instead (live.port off, on, "
                                                        "with --viewers pages open, polled without pause)")
    ap.add_argument("--viewers", default="1,3", help="with --live: numbers of pages open at once, each holding the "
                                                     "MJPEG stream (default 1,3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = ap.parse_args()
    args.cameras, args.batches, args.viewers = counts(args.cameras), counts(args.batches), counts(args.viewers)
    args.batches_raw = sorted({1, 2, 4, 8, 16} | set(args.batches))
    logging.basicConfig(level=logging.WARNING)
    binary = mosquitto_binary()
    if not binary:
        print("pipeline: error: mosquitto not found (make broker)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="edge-pipeline-"))
    demo_fit = None if args.no_demo_fit or args.live else demo_fit_seconds(work)  # first, while nothing else has run
    if demo_fit is not None and not args.json:
        print(f"make demo's fit (edge-train fit on the demo's 60 generated parts, process start-up included): "
              f"{demo_fit:.1f} s")
    broker = Mosquitto(work / "broker", free_port(), binary)
    results = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            result = (measure_live if args.live else measure_model)(name, args, work, broker.url)
            result["machine_cores"] = len(os.sched_getaffinity(0))
            results.append(result)
            if not args.json:
                (print_live if args.live else print_tables)(result)
    finally:
        broker.stop()
    if args.json:
        print(json.dumps(rounded({"results": results, "demo_fit_s": demo_fit, "argv": sys.argv[1:]})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
