"""How a frame is fitted to the model input (stretch, letterbox, crop) is part of the bundle contract:
resize_frame on real arrays, the manifest's input.resize round trip and refusal, and a real station run
whose backend receives letterboxed frames."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edge_helpers import Collector, check_payloads, run_cli, toy_model, wait_stopped, write_video

from core.bundle import MANIFEST, Bundle, load_bundle, new_version_dir, write_manifest
from core.errors import BundleError
from core.preprocess import RESIZE_MODES, resize_frame
from edge.config import CameraConfig
from edge.sources import CameraSource, FrameQueue


def _previous_resize_frame(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """resize_frame as it was before resize modes existed (the reference for stretch)."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    h, w = hw
    if image.shape[0] == h and image.shape[1] == w:
        return np.ascontiguousarray(image, dtype=np.uint8)
    shrink = image.shape[0] > h or image.shape[1] > w
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _noise(shape: tuple[int, ...], seed: int = 0, low: int = 1) -> np.ndarray:
    """Random uint8 content that is never 0, so black letterbox bars are told apart from it."""
    return np.random.default_rng(seed).integers(low, 256, size=shape, dtype=np.uint8)


SHAPES = [(240, 320, 3), (320, 240, 3), (480, 640, 3), (30, 40, 3), (100, 100, 3), (37, 91, 3), (240, 320),
          (240, 320, 4), (32, 32, 3)]
TARGETS = [(32, 32), (48, 64), (64, 48), (32, 45)]


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hw", TARGETS)
def test_every_mode_gives_exactly_the_input_size_as_bgr_uint8(mode: str, shape: tuple[int, ...],
                                                              hw: tuple[int, int]) -> None:
    out = resize_frame(_noise(shape), hw, mode)
    assert out.shape == (*hw, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hw", TARGETS)
def test_stretch_is_the_previous_resize_exactly(shape: tuple[int, ...], hw: tuple[int, int]) -> None:
    image = _noise(shape, seed=3)
    expected = _previous_resize_frame(image, hw)
    assert np.array_equal(resize_frame(image, hw), expected)  # stretch is the default
    assert np.array_equal(resize_frame(image, hw, "stretch"), expected)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="stretch, letterbox, crop"):
        resize_frame(_noise((24, 32, 3)), (16, 16), "fit")
    with pytest.raises(ValueError, match="stretch, letterbox, crop"):
        CameraSource(CameraConfig(id="cam0", source="x.avi"), (16, 16), FrameQueue(2), resize="Letterbox")


def _content_box(out: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the non-black region; asserts everything outside it is black."""
    rows = np.flatnonzero(out.any(axis=(1, 2)))
    cols = np.flatnonzero(out.any(axis=(0, 2)))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    inside = np.zeros(out.shape[:2], bool)
    inside[top:bottom, left:right] = True
    assert not out[~inside].any(), "bars must be pure black"
    return top, bottom, left, right


@pytest.mark.parametrize(
    "shape, hw, box",
    [
        ((240, 320, 3), (32, 32), (4, 28, 0, 32)),  # wide frame, square input: 4-row bars top and bottom
        ((320, 240, 3), (32, 32), (0, 32, 4, 28)),  # tall frame: bars left and right
        ((100, 100, 3), (48, 64), (0, 48, 8, 56)),  # square frame, wide input: bars left and right
        ((100, 100, 3), (64, 48), (8, 56, 0, 48)),  # square frame, tall input: bars top and bottom
        ((100, 100, 3), (32, 45), (0, 32, 6, 38)),  # odd leftover: the extra column goes right (6 | 7)
        ((30, 40, 3), (64, 64), (8, 56, 0, 64)),  # enlarging
        ((480, 640, 3), (48, 64), (0, 48, 0, 64)),  # same aspect ratio: no bars at all
    ],
)
def test_letterbox_keeps_the_aspect_ratio_with_black_bars(shape: tuple[int, ...], hw: tuple[int, int],
                                                          box: tuple[int, int, int, int]) -> None:
    image = _noise(shape, seed=1)
    out = resize_frame(image, hw, "letterbox")
    assert _content_box(out) == box
    top, bottom, left, right = box
    ch, cw = bottom - top, right - left
    assert abs(cw / ch - shape[1] / shape[0]) <= 1.0 / min(ch, cw)  # aspect ratio kept to within a pixel
    # the content is the whole frame, scaled with the stretch rule (area when shrinking, linear when enlarging)
    assert np.array_equal(out[top:bottom, left:right], resize_frame(image, (ch, cw), "stretch"))


def test_letterbox_of_gray_and_bgra_frames() -> None:
    gray = np.full((240, 320), 90, np.uint8)
    out = resize_frame(gray, (32, 32), "letterbox")
    assert _content_box(out) == (4, 28, 0, 32) and (out[4:28] == 90).all()
    bgra = np.dstack([np.full((240, 320), v, np.uint8) for v in (10, 20, 30, 255)])
    out = resize_frame(bgra, (32, 32), "letterbox")
    assert out.shape == (32, 32, 3) and (out[4:28] == [10, 20, 30]).all() and not out[:4].any()


def _target_frame(h: int, w: int) -> np.ndarray:
    """Red outside the centred square of side min(h, w), green inside it, a blue dot at its centre."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (0, 0, 255)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img[top:top + s, left:left + s] = (0, 255, 0)
    c = s // 8
    img[h // 2 - c:h // 2 + c, w // 2 - c:w // 2 + c] = (255, 0, 0)
    return img


@pytest.mark.parametrize("shape", [(240, 320), (320, 240), (300, 500)])
def test_crop_keeps_the_centre_and_fills_everything(shape: tuple[int, int]) -> None:
    h, w = shape
    image = _target_frame(h, w)
    out = resize_frame(image, (32, 32), "crop")
    assert out.shape == (32, 32, 3)
    assert out.any(axis=2).all(), "crop leaves no black pixel"
    assert (out[..., 2] == 0).all(), "the sides beyond the centred square are cut away"
    assert (out[14:18, 14:18] == (255, 0, 0)).all(), "the centre stays at the centre"
    assert (out[0, :] == (0, 255, 0)).all() and (out[:, 0] == (0, 255, 0)).all()
    # exactly the centred square of the source, scaled with the stretch rule
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    assert np.array_equal(out, resize_frame(image[top:top + s, left:left + s], (32, 32), "stretch"))


def test_crop_to_a_non_square_input() -> None:
    image = _noise((240, 320, 3), seed=2)  # 4:3 frame into a 2:1 input: rows cut at the top and bottom
    out = resize_frame(image, (32, 64), "crop")
    assert np.array_equal(out, resize_frame(image[40:200], (32, 64), "stretch"))
    small = _noise((30, 40, 3), seed=2)  # enlarging: linear interpolation of the centre region
    out = resize_frame(small, (64, 64), "crop")
    assert np.array_equal(out, cv2.resize(small[:, 5:35], (64, 64), interpolation=cv2.INTER_LINEAR))


# -- the manifest ------------------------------------------------------------------------------------
def _write_bundle(root: Path, resize: str | None, hw: tuple[int, int] = (32, 32)) -> Path:
    """A real toy bundle (ONNX graph + manifest) written through core.bundle, with input.resize when given."""
    d = new_version_dir(root, "toy")
    onnx.save(toy_model(hw), str(d / "model.onnx"))
    spec: dict[str, object] = {"height": hw[0], "width": hw[1]}
    if resize is not None:
        spec["resize"] = resize
    write_manifest(
        d, model_name="toy", input_spec=spec,
        outputs=[{"name": "score", "dtype": "float32", "shape": ["N"]},
                 {"name": "anomaly_map", "dtype": "float32", "shape": ["N", hw[0], hw[1]]}],
        calibration={"threshold": 0.1, "method": "fixed (toy)"},
        training_data={"count": 0, "hash": "none"}, metrics={},
    )
    return d


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_manifest_round_trip(tmp_path: Path, mode: str) -> None:
    d = _write_bundle(tmp_path, mode)
    assert json.loads((d / MANIFEST).read_text())["input"]["resize"] == mode
    assert load_bundle(d).input_resize == mode


def test_older_bundle_without_the_key_stretches(tmp_path: Path) -> None:
    b = load_bundle(_write_bundle(tmp_path, None))
    assert "resize" not in b.manifest["input"] and b.input_resize == "stretch"
    assert Bundle(path=tmp_path, manifest={"input": {"height": 1, "width": 1}}).input_resize == "stretch"


def test_trainer_cannot_write_an_unknown_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resize"):
        _write_bundle(tmp_path, "squash")


@pytest.mark.parametrize("value", ["fisheye", "", None, 3, "Letterbox"])
def test_unknown_mode_in_a_manifest_is_refused_in_one_line(tmp_path: Path, value: object) -> None:
    d = _write_bundle(tmp_path, "letterbox")
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["input"]["resize"] = value
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as info:
        load_bundle(d)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(d / MANIFEST))
    assert f"input.resize {value!r}" in msg and "stretch, letterbox, crop" in msg and "re-export" in msg


# -- a real station run ------------------------------------------------------------------------------
def _decoded_frames(video: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    cap.release()
    return frames


def test_station_feeds_the_backend_letterboxed_frames(tmp_path: Path, mosquitto: str) -> None:
    """A 320x240 clip through a bundle that says letterbox: the scores the station publishes are the toy
    model's scores of letterboxed frames (black bars and all), not of stretched ones."""
    bundle = _write_bundle(tmp_path / "engines", "letterbox")
    defects = [(10, 30)]
    video = write_video(tmp_path / "wide.avi", defects, 45, size=(240, 320), fps=10.0)
    frames = _decoded_frames(video)
    assert len(frames) == 45 and frames[0].shape == (240, 320, 3)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])

    def scores(mode: str) -> np.ndarray:
        batch = np.stack([resize_frame(f, (32, 32), mode) for f in frames])
        return np.asarray(session.run(["score"], {"frames": batch})[0], np.float64)

    letterbox, stretch = scores("letterbox"), scores("stretch")
    # the planted defect covers a quarter of the frame: 1/4 of the input stretched, 3/16 letterboxed (bars)
    assert letterbox[20] == pytest.approx(3 / 16, abs=0.02) and stretch[20] == pytest.approx(1 / 4, abs=0.02)

    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"""station: st-letterbox
state_dir: {tmp_path / 'state'}
engine:
  max_batch: 4
  max_wait_ms: 5
events:
  k: 3
  n: 5
  close_after: 5
  update_interval_s: 0.2
mqtt:
  stats_interval_s: 0.5
  flush_timeout_s: 10
""", encoding="utf-8")
    with Collector(mosquitto, ["anomaly/st-letterbox/#"]) as col:
        proc = run_cli("edge-run", ["--config", str(cfg), "--camera", str(video), "--engine", str(bundle),
                                    "--mqtt", mosquitto], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        wait_stopped(col)
        events = check_payloads(col)["event"]
    assert [e["type"] for e in events][0] == "start" and events[-1]["type"] == "end"
    assert any(e["type"] == "update" for e in events)
    start = events[0]
    assert defects[0][0] <= start["frame"] < defects[0][1]
    for e in events:  # every published score is that of the letterboxed frame at its index
        assert e["score"] == pytest.approx(letterbox[e["frame"]], abs=2e-6), e
    inside = [e for e in events if defects[0][0] <= e["frame"] < defects[0][1]]
    assert inside and all(abs(stretch[e["frame"]] - e["score"]) > 0.03 for e in inside)
    end = events[-1]
    assert end["peak_score"] == pytest.approx(letterbox[start["frame"]:end["frame"] + 1].max(), abs=2e-6)


# -- grey and 16-bit images: the trainer's reader and the station's frames agree ----------------------------
def _grey(depth: type, shape: tuple[int, int] = (90, 140), seed: int = 5) -> np.ndarray:
    top = 256 if depth is np.uint8 else 65536
    return np.random.default_rng(seed).integers(0, top, size=shape).astype(depth)


@pytest.mark.parametrize("depth", [np.uint8, np.uint16])
@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_a_grey_image_reaches_the_model_alike_from_disk_and_from_a_camera(tmp_path: Path, depth: type,
                                                                         mode: str) -> None:
    from edge.sources.kinds.folder import FolderCapture
    from trainer.data import read_image

    grey = _grey(depth)
    path = tmp_path / "grey.png"
    assert cv2.imwrite(str(path), grey)
    hw = (64, 64)
    trained = read_image(path, hw, mode)  # what the trainer fits on
    ok, from_folder = FolderCapture([path]).read()  # a station reading the folder
    assert ok and from_folder is not None
    seen = [resize_frame(from_folder, hw, mode), resize_frame(grey, hw, mode), resize_frame(grey[..., None], hw, mode)]
    for frame in seen:  # and a camera delivering [H,W] or [H,W,1] grey, 8 or 16 bits
        assert frame.dtype == np.uint8 and np.array_equal(frame, trained)
    # grey replicated: B = G = R, so ImageNet-RGB backbones see grey in all three channels and the models that
    # work in grey (input.channels: gray) get the grey value back from the luma exactly
    assert np.array_equal(trained[..., 0], trained[..., 1]) and np.array_equal(trained[..., 1], trained[..., 2])
    top_byte = (grey >> 8).astype(np.uint8) if depth is np.uint16 else grey
    assert np.array_equal(resize_frame(grey, grey.shape, mode)[..., 0], top_byte)


def test_grey_luma_in_the_graph_is_the_grey_value() -> None:
    import torch

    from trainer.ingraph import FrameInput

    frame = resize_frame(_grey(np.uint8), (64, 64))
    luma = FrameInput(1)(torch.from_numpy(frame[None]))[0, 0].numpy()
    np.testing.assert_allclose((luma + 1.0) * 127.5, frame[..., 0].astype(np.float32), atol=1e-3)


def test_frames_of_other_types_and_shapes_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="frames must be uint8 or uint16, not float32"):
        resize_frame(np.zeros((8, 8, 3), np.float32), (8, 8))
    with pytest.raises(ValueError, match=r"frames must be \[H,W\], \[H,W,1\], \[H,W,3\] or \[H,W,4\], not \[8, 8, 2\]"):
        resize_frame(np.zeros((8, 8, 2), np.uint8), (8, 8))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_an_event_snapshot_heats_the_defect_in_every_resize_mode(mode: str) -> None:
    """The snapshot an event carries: a bright square off-centre in a 96x160 camera frame, fitted to a 32x32 model
    by ``mode``; the model's map on that input (bright there) drawn back on the frame is hottest on the square
    (red above blue), cold far from it. Stretching the map over the whole frame, as snapshots once did, put a
    letterboxed or cropped frame's heat beside the defect."""
    from edge.pipeline import render_snapshot

    frame = np.full((96, 160, 3), 60, np.uint8)
    frame[40:56, 100:116] = 255
    fitted = resize_frame(frame, (32, 32), mode)
    amap = (fitted > 200).mean(axis=2).astype(np.float32)
    assert amap.max() > 0  # the model saw the square (crop keeps the centre 96x96, which holds it)
    shot = cv2.imdecode(np.frombuffer(render_snapshot(frame, amap, (32, 32), mode), np.uint8), cv2.IMREAD_COLOR)
    heat = shot[..., 2].astype(int) - shot[..., 0].astype(int)  # red minus blue: JET's hot end
    assert heat[44:52, 104:112].mean() > 45, heat[44:52, 104:112].mean()  # stretched over a letterbox: 37
    assert heat[:, :40].mean() < 0 and heat[:16].mean() < 0  # far from it: JET's cold end
