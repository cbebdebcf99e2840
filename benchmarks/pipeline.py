"""edge-run's pipeline on generated video against its own backend's ceiling and a hand-written loop, one run.

    python benchmarks/pipeline.py [--frames 600] [--size 640x480] [--json]

In one process, on one generated clip (640x480 parts with planted defects, MJPG like a USB camera):
- **raw**: the station's backend (ONNX Runtime) on the same frames already decoded and resized, in memory,
  at batch 1, 2, 4, 8: the ceiling;
- **edge-run**: the station's pipeline (capture thread, resize, batcher, backend, events, spool, MQTT to a real
  Mosquitto started here), built as `edge-run --camera CLIP` builds it; frames/s, efficiency (÷ best raw),
  capture-to-decision latency p50/p99, CPU use and peak resident memory, and the seconds each stage took
  (decode and resize run on the capture thread, queue wait / inference / events on the main thread, publish
  on the sender thread: stages on different threads overlap);
- **naive**: a loop a user would write: read a frame with OpenCV, resize it, to a torch tensor, run the
  PatchCore torch module eagerly, one frame at a time.
The model is PatchCore with the defaults of config/train.yaml, fitted here on generated parts.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edge_helpers import Mosquitto, free_port, mosquitto_binary  # noqa: E402

from edge.backends.onnxruntime import OrtBackend  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.sources import resize_frame  # noqa: E402


def fit(work: Path) -> tuple[Path, Any]:
    """A PatchCore bundle (what the station runs) and its torch export module (what the naive loop runs)."""
    import torch

    from trainer.config import load_train_config
    from trainer.data import train_paths
    from trainer.frames import TrainingData
    from trainer.models import RunOptions
    from trainer.models.patchcore import PatchCore
    from trainer.pipeline import fit_bundle
    from trainer.synthetic import make_dataset

    data = make_dataset(work / "data", n_train=50, n_test_good=0, n_test_defect=0, size=160, seed=0)
    cfg = load_train_config(None)
    bundle = fit_bundle(cfg, data, work / "engines", log=lambda _m: None)
    cfg = load_train_config(None)
    cfg.resolve(PatchCore.defaults, all_gray=False)
    model = PatchCore(cfg)
    paths = train_paths(data)
    model.fit(TrainingData(fit_paths=paths, holdout_paths=[], hw=cfg.input.hw, resize=cfg.input.resize, val=None,
                           workers=0, seed=0), lambda _m: None, RunOptions())
    module = model.export_module().eval()
    torch.set_num_threads(2)
    return bundle, module


def raw_backend(bundle_dir: Path, frames: np.ndarray, batches: list[int], seconds: float) -> dict[int, float]:
    bundle = load_bundle(bundle_dir)
    out = {}
    for b in batches:
        backend = OrtBackend(bundle, max_batch=b)
        n = done = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            start = (n * b) % (len(frames) - b)
            backend.infer(frames[start:start + b])
            n += 1
            done += b
        out[b] = done / (time.perf_counter() - t0)
        backend.close()
    return out


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


def edge_run(clip: Path, bundle_dir: Path, work: Path, broker_url: str, threads: int,
             cameras: int = 1) -> dict[str, Any]:
    """The station exactly as edge-run builds it (edge.cli), run in this process so its clocks can be read;
    ``cameras`` copies of the clip, one camera each."""
    from edge.cli import _build, run_parser

    cfg_path = work / f"station-{cameras}.yaml"
    cfg_path.write_text(f"station: bench{cameras}\nstate_dir: {work / 'state'}\nmqtt: {{stats_interval_s: 1}}\n"
                        f"engine: {{intra_op_threads: {threads}}}\n")
    camera_args = [a for i in range(cameras) for a in ("--camera", f"cam{i}={clip}")]
    args = run_parser().parse_args(["--config", str(cfg_path), *camera_args, "--engine", str(bundle_dir),
                                    "--mqtt", broker_url, "--log-level", "WARNING"])
    t_start = time.perf_counter()
    cfg, bundle, publisher, station = _build(args)
    publisher.start()
    publisher.wait_first_attempt(5.0)
    startup = time.perf_counter() - t_start
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = station.run()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    publisher.stop()
    station.backend.close()
    station.spool.close()
    lat50, lat99 = station.stats.latency_ms.percentiles(50, 99)
    stages = station.clock.snapshot()
    stages["publish"] = publisher.publish_seconds
    return {"frames": result.frames, "seconds": wall, "fps": result.frames / wall, "batch": station.backend.max_batch,
            "startup_s": startup, "latency_p50_ms": lat50, "latency_p99_ms": lat99,
            "cpu_percent": 100.0 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / wall,
            "max_rss_mb": ru1.ru_maxrss / 1024.0, "stages_s": stages, "events": result.events}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--size", default="640x480", help="clip frame size WxH (default 640x480)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per raw batch size (default 3)")
    ap.add_argument("--codec", default="MJPG", help="clip codec: MJPG (what USB cameras send, default) or FFV1")
    ap.add_argument("--threads", type=int, default=0, help="edge-run's engine.intra_op_threads (0 = its default)")
    ap.add_argument("--cameras", default="1", help="comma-separated camera counts for a scaling table (e.g. 1,2,4)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    binary = mosquitto_binary()
    if not binary:
        print("pipeline: error: mosquitto not found (make broker)", file=sys.stderr)
        return 2
    from trainer.synthetic import write_clip

    w, h = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="edge-pipeline-"))
    bundle_dir, module = fit(work)
    bundle = load_bundle(bundle_dir)
    clip = write_clip(work / "line.avi", (h, w), args.frames, [(args.frames // 5, args.frames // 5 + 30)], seed=3,
                      codec=args.codec)
    cap = cv2.VideoCapture(str(clip))
    decoded = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        decoded.append(resize_frame(img, bundle.input_hw, bundle.input_resize))
    frames = np.stack(decoded)
    broker = Mosquitto(work / "broker", free_port(), binary)
    try:
        raw = raw_backend(bundle_dir, frames, [1, 2, 4, 8], args.seconds)
        station = edge_run(clip, bundle_dir, work, broker.url, args.threads)
        base = naive(clip, module, bundle.input_hw, args.frames)
        counts = [int(c) for c in args.cameras.split(",") if int(c) > 1]
        scaling = {c: edge_run(clip, bundle_dir, work, broker.url, args.threads, cameras=c) for c in counts}
    finally:
        broker.stop()
    best = max(raw.values())
    result = {"machine_cores": len(__import__("os").sched_getaffinity(0)), "clip": f"{w}x{h}", "frames": len(frames),
              "model": f"{bundle.model_name} {bundle.input_hw[0]}x{bundle.input_hw[1]}",
              "raw_fps_by_batch": {str(k): round(v, 1) for k, v in raw.items()}, "raw_best_fps": round(best, 1),
              "edge_run": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in station.items()
                           if k != "stages_s"},
              "stages_s": {k: round(v, 3) for k, v in station["stages_s"].items()},
              "efficiency": round(station["fps"] / best, 3), "naive_fps": round(base, 1),
              "vs_naive": round(station["fps"] / base, 2),
              "cameras": {str(c): {"fps_total": round(r["fps"], 1), "batch": r["batch"],
                                   "latency_p50_ms": r["latency_p50_ms"], "latency_p99_ms": r["latency_p99_ms"]}
                          for c, r in [(1, station), *scaling.items()]}}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']} on a {result['clip']} clip of {result['frames']} frames, {result['machine_cores']} cores")
    print(f"{'path':<28}{'frames/s':>10}")
    for b, fps in raw.items():
        print(f"{'raw backend, batch ' + str(b):<28}{fps:>10.1f}")
    e = station
    print(f"{'edge-run (batch ' + str(e['batch']) + ')':<28}{e['fps']:>10.1f}   efficiency {result['efficiency']:.2f} "
          f"of the best raw, {result['vs_naive']:.2f}x naive")
    print(f"{'naive loop (torch, eager)':<28}{base:>10.1f}")
    print(f"latency capture->decision p50 {e['latency_p50_ms']} ms, p99 {e['latency_p99_ms']} ms; CPU "
          f"{e['cpu_percent']:.0f} %; peak RSS {e['max_rss_mb']:.0f} MB; start-up {e['startup_s']:.2f} s")
    print("seconds per stage over the run (" + f"{e['seconds']:.2f} s wall; stages on other threads overlap):")
    for k, v in result["stages_s"].items():
        print(f"  {k:<12}{v:8.3f}")
    if scaling:
        print("cameras (each the clip, read as fast as it decodes): frames/s in all, batch, latency p50 / p99 ms")
        for c, r in result["cameras"].items():
            print(f"  {c:>3}  {r['fps_total']:8.1f}  {r['batch']:>3}  {r['latency_p50_ms']} / {r['latency_p99_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
