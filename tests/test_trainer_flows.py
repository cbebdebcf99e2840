"""trainer/flows.py, the flow family's shared parts: the feature cache runs the extractor once per distinct frame
and stays within its bound, packing round-trips, the log-likelihood matches torch.distributions and, through a
real FrEIA flow, the change-of-variables formula computed independently (autograd Jacobian, slogdet); the flows
invert exactly and are reproducible from their seed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import onnx
import pytest
import torch
from torch import nn

from trainer.flows import (
    FeatureCache,
    conv_subnet,
    fc_subnet,
    flow,
    frame_key,
    log_density,
    log_likelihood,
    pack_maps,
    unpack_maps,
)


class CountingConv(nn.Module):
    """A real (small) feature extractor that counts the frames it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.frames_seen = 0

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        self.frames_seen += int(frames.shape[0])
        return pack_maps([self.conv(frames.permute(0, 3, 1, 2).float() / 255.0)])


def _frames(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_cache_runs_the_extractor_once_per_distinct_frame() -> None:
    net = CountingConv()
    cache = FeatureCache(net, max_bytes=1 << 20)
    frames = _frames(6, 0)
    first = cache(frames[:4])
    again = cache(frames[[3, 1, 4, 5, 0]])  # 3 known, 2 new
    assert net.frames_seen == 6 and cache.hits == 3 and cache.misses == 6 and len(cache) == 6
    with torch.no_grad():
        direct = net(frames)  # 6 more frames seen
    assert torch.equal(first, direct[:4]) and torch.equal(again, direct[[3, 1, 4, 5, 0]])
    changed = frames[:1].clone()
    changed[0, 0, 0, 0] ^= 1  # one bit of one pixel: another frame, another key
    assert frame_key(changed[0]) != frame_key(frames[0])
    cache(changed)
    assert net.frames_seen == 13


def test_the_cache_stays_within_its_bound_and_still_answers() -> None:
    net = CountingConv()
    per_frame = 4 * 4 * 4 * 4  # 4 channels x 4 x 4 float32
    cache = FeatureCache(net, max_bytes=3 * per_frame)
    frames = _frames(5, 1)
    out = cache(frames)
    assert len(cache) == 3 and cache.bytes == 3 * per_frame
    assert torch.equal(cache(frames), out)  # the two not kept are computed again, the same
    assert net.frames_seen == 7
    with pytest.raises(ValueError):
        FeatureCache(net, max_bytes=-1)


def test_admit_after_two_keeps_only_frames_seen_again() -> None:
    """Codec-robust training shows one-off degraded draws: they must not fill the cache."""
    net = CountingConv()
    cache = FeatureCache(net, max_bytes=1 << 20, admit_after=2)
    clean, once = _frames(3, 2), _frames(3, 3)
    cache(torch.cat([clean, once]))
    assert len(cache) == 0
    cache(clean)
    assert len(cache) == 3 and net.frames_seen == 9
    cache(clean)
    assert net.frames_seen == 9 and cache.hits == 3


def test_pack_and_unpack_round_trip() -> None:
    maps = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    packed = pack_maps(maps)
    assert packed.shape == (2, 3 * 16 + 5 * 4)
    back = unpack_maps(packed, [(3, 4, 4), (5, 2, 2)])
    assert all(torch.equal(a, b) for a, b in zip(maps, back, strict=True))
    with pytest.raises(ValueError, match="68 values"):
        unpack_maps(packed, [(3, 4, 4)])


def test_log_density_is_the_standard_normal() -> None:
    z = torch.randn(5, 7, 3, 3, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    assert torch.allclose(log_density(z, 1), normal.log_prob(z).sum(1))
    assert torch.allclose(log_density(z, (1, 2, 3)), normal.log_prob(z).sum((1, 2, 3)))
    assert log_density(torch.zeros(1, 2), 1).item() == pytest.approx(-math.log(2 * math.pi))


def test_a_conditional_vector_flow_inverts_and_its_likelihood_is_the_change_of_variables() -> None:
    torch.manual_seed(0)
    inn = flow((6,), [fc_subnet(2.0)] * 4, clamp=1.9, seed=3, cond_dims=(4,), permute_soft=True).double()
    for p in inn.parameters():  # move off the near-identity start so the test has teeth (not the permutations)
        if p.requires_grad:
            p.data.add_(torch.randn_like(p))
    x = torch.randn(5, 6, dtype=torch.float64)
    c = torch.randn(5, 4, dtype=torch.float64)
    z, log_det = inn(x, c=[c])
    back, _ = inn(z, c=[c], rev=True)
    assert torch.allclose(back, x, atol=1e-4)  # the soft permutation is orthogonal to float32 rounding
    assert log_det.abs().max() > 1.0  # far from volume-preserving: the log-det terms are really checked
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: inn(v[None], c=[c[i:i + 1]])[0][0], x[i])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign.item() != 0
        # FrEIA counts the soft permutation's log|det| as 0: it is orthogonal to float32 rounding (1e-7)
        assert log_det[i].item() == pytest.approx(logabs.item(), abs=1e-6)
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(z[i]).sum() + logabs
        assert log_likelihood(z[i:i + 1], log_det[i:i + 1])[0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_a_convolutional_map_flow_inverts_and_is_reproducible_from_its_seed() -> None:
    subnets = [conv_subnet(3 if i % 2 == 0 else 1, 1.0) for i in range(4)]
    torch.manual_seed(1)
    a = flow((4, 5, 5), subnets, clamp=2.0, seed=7)
    torch.manual_seed(1)
    b = flow((4, 5, 5), subnets, clamp=2.0, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    x = torch.randn(2, 4, 5, 5)
    z, log_det = a(x)
    assert z.shape == x.shape and log_det.shape == (2,)
    back, _ = a(z, rev=True)
    assert torch.allclose(back, x, atol=1e-5)
    with pytest.raises(ValueError):
        conv_subnet(2)


def test_the_static_block_is_freias_and_exports_with_fixed_shapes(tmp_path: Path) -> None:
    """Same outputs as FrEIA's AllInOneBlock from the same parameters; traced to ONNX with a dynamic batch, every
    intermediate's shape is known but the batch (FrEIA's own block leaves its coupling Slice's shape unknown)."""
    subnets = [conv_subnet(3, 1.0), conv_subnet(1, 1.0)]
    ours = flow((4, 5, 5), subnets, clamp=2.0, seed=2)
    theirs = Ff.SequenceINN(4, 5, 5)
    for subnet in subnets:
        theirs.append(Fm.AllInOneBlock, subnet_constructor=subnet, affine_clamping=2.0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        for rev in (False, True):
            (a, ja), (b, jb) = ours(x, rev=rev), theirs(x, rev=rev)
            assert torch.allclose(a, b) and torch.allclose(ja, jb)

    class Graph(nn.Module):
        def __init__(self, inn: nn.Module) -> None:
            super().__init__()
            self.inn = inn

        def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inn(v)  # type: ignore[no-any-return]

    def unknown_dims(inn: nn.Module) -> list[str]:
        path = tmp_path / "flow.onnx"
        batch = {0: "N"}
        torch.onnx.export(Graph(inn).eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["z", "log_det"], dynamic_axes={"x": batch, "z": batch, "log_det": batch})
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
        return [vi.name for vi in graph.value_info
                if any(not d.dim_value for d in list(vi.type.tensor_type.shape.dim)[1:])]

    assert unknown_dims(ours) == []
    assert unknown_dims(theirs)  # the reason for the subclass


def test_codec_robust_copies_are_fixed_draws_for_models_that_cache_features(tmp_path: Path) -> None:
    """With the shipped codec-robust training on, a flow still runs its backbone once per distinct frame: its
    epochs show each still and a degraded copy that is the same draw every epoch (a fresh draw per epoch, what
    the other models get, is a frame seen once and would run the backbone every epoch)."""
    from trainer.config import parse_train_config
    from trainer.models import get_model_class
    from trainer.pipeline import fit_bundle
    from trainer.synthetic import DEFECT_KINDS, make_dataset

    parts = make_dataset(tmp_path / "ds", n_train=20, n_test_good=2, n_test_defect=2, size=64, seed=3,
                         kinds=DEFECT_KINDS)
    # FastFlow at 2 flow steps: the cheapest flow to fit (the cache, not the flow, is under test)
    cfg = parse_train_config("model: fastflow\ninput: {height: 64, width: 64}\nepochs: 3\ntraining: {workers: 0}\n"
                             "fastflow: {flow_steps: 2}\nexport: {fp16: false}\nreport: {overlays: 0}\n")
    assert getattr(get_model_class("fastflow"), "caches_features", False)
    bundle = fit_bundle(cfg, parts, tmp_path / "engines", log=lambda _m: None)
    fit = json.loads((bundle / "report.json").read_text())["fit"]
    cache = fit["feature_cache"]
    # 16 fitted and 4 held-out stills, each with one degraded copy: 40 distinct frames over 3 epochs
    assert cache["misses"] == 40, cache
    assert cache["hits"] >= 2 * 32, cache


def test_fixed_draws_repeat_across_epochs_and_fresh_draws_do_not(tmp_path: Path) -> None:
    from trainer.degrade import Degradation
    from trainer.frames import TrainingData, set_epoch
    from trainer.synthetic import make_dataset

    parts = make_dataset(tmp_path / "ds", n_train=4, n_test_good=0, n_test_defect=0, size=32, seed=3)
    paths = sorted((parts / "train" / "good").iterdir())
    data = TrainingData(fit_paths=paths, holdout_paths=[], hw=(32, 32), degradation=Degradation(),
                        degraded_copies=1)

    def epochs(**kwargs: Any) -> list[torch.Tensor]:
        loader = data.loader(paths, 8, **kwargs)
        out = []
        for epoch in (0, 1):
            set_epoch(loader, epoch)
            out.append(torch.cat(list(loader)))
        return out

    first, second = epochs(fixed_draws=True)
    assert first.shape[0] == 8 and torch.equal(first, second)  # 4 stills + 4 copies, the same both epochs
    first, second = epochs()
    assert torch.equal(first[:4], second[:4]) and not torch.equal(first[4:], second[4:])
