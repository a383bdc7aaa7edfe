"""DSA: shapes, determinism from the seed, differentiability, and what each family does."""

from __future__ import annotations

import random

import pytest
import torch

from dpd_cli.core import augment
from dpd_cli.core.augment import _APPLY, _DRAW, OPS, dsa
from tests.helpers import assert_close


def _x(n=8, c=3, side=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, side, side, generator=g, dtype=dtype)


def _only(op):
    return lambda x, seed: dsa(x, seed, ops=(op,))


def test_ops_table_matches_public_names():
    assert set(_DRAW) == set(_APPLY) == set(OPS) == {"color", "crop", "cutout", "flip", "scale", "rotate"}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_keeps_shape_and_dtype(op, dtype):
    x = _x(n=3, c=3, side=10, dtype=dtype)
    y = _only(op)(x, 7)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()
    # non-square images too
    z = _only(op)(torch.randn(2, 1, 6, 9, dtype=dtype), 3)
    assert z.shape == (2, 1, 6, 9)


@pytest.mark.parametrize("op", OPS)
def test_op_same_seed_same_output_different_seed_differs(op):
    x = _x()
    assert torch.equal(_only(op)(x, 11), _only(op)(x, 11))
    outs = [_only(op)(x, s) for s in range(4)]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])
    assert not torch.equal(outs[0], x)


def test_dsa_same_seed_same_output_different_seeds_differ():
    x = _x()
    assert torch.equal(dsa(x, 123), dsa(x, 123))
    outs = [dsa(x, s) for s in range(10)]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.equal(outs[i], outs[j]), (i, j)


def test_dsa_does_not_touch_global_rng():
    torch.manual_seed(5)
    random.seed(5)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(5)
    random.seed(5)
    dsa(_x(), 42)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_dsa_chooses_the_op_from_the_seed_and_all_six_appear(monkeypatch):
    x = _x()
    seen = []
    originals = dict(_APPLY)
    for name, fn in originals.items():
        monkeypatch.setitem(_APPLY, name, lambda x, *p, _fn=fn, _name=name: (seen.append(_name), _fn(x, *p))[1])
    for seed in range(60):
        y = dsa(x, seed)
        expected_op = OPS[random.Random(seed).randrange(len(OPS))]
        assert seen[-1] == expected_op
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(y, originals[expected_op](x, *_DRAW[expected_op](x, g, len(x))))
    assert set(seen) == set(OPS)
    # ops= restricts the choice
    seen.clear()
    for seed in range(20):
        dsa(x, seed, ops=("flip", "crop"))
    assert set(seen) == {"flip", "crop"}


def test_dsa_reuses_one_generator_and_replays_what_a_fresh_generator_gives(monkeypatch):
    """One generator per device, re-seeded per call: bit for bit what a new generator per call gave."""
    cases = [(_x(), s, OPS) for s in range(24)]  # every family, each drawing a different amount
    cases += [(_x(n=5, c=1, side=9, dtype=torch.float64, seed=1), s, OPS) for s in (3, 77, 2**62 + 5)]
    cases += [(_x(n=3, c=2, side=6, seed=2), s, ("crop", "cutout")) for s in (8, 9)]
    expected = []
    for x, seed, ops in cases:  # the behaviour before the generator was kept: a fresh one per call
        op = ops[random.Random(seed).randrange(len(ops))]
        expected.append(_APPLY[op](x, *_DRAW[op](x, torch.Generator().manual_seed(seed), len(x))))
    created = []
    real_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda *a, **k: (created.append(1), real_generator(*a, **k))[1])
    monkeypatch.setattr(augment, "_GENERATORS", {})
    for _ in range(2):  # twice over: re-seeding must undo whatever the previous call drew
        for (x, seed, ops), want in zip(cases, expected, strict=True):
            assert torch.equal(dsa(x, seed, ops=ops), want)
    assert len(created) == 1


@pytest.mark.parametrize("op", OPS)
def test_op_gradcheck(op):
    # Every family is affine in x once its random parameters are fixed by the seed.
    x = _x(n=2, c=2, side=5, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _only(op)(t, 5), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_gradient_reaches_every_image(op):
    x = _x(n=4).requires_grad_(True)
    _only(op)(x, 9).square().sum().backward()
    assert x.grad is not None
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_flip_all_and_none(monkeypatch):
    x = _x()
    monkeypatch.setattr(augment, "_FLIP", 1.01)
    assert torch.equal(_only("flip")(x, 0), x.flip(3))
    monkeypatch.setattr(augment, "_FLIP", 0.0)
    assert torch.equal(_only("flip")(x, 0), x)


def test_flip_is_per_image():
    x = _x(n=32)
    y = _only("flip")(x, 1)
    flipped = [torch.equal(a, b.flip(2)) for a, b in zip(y, x)]
    same = [torch.equal(a, b) for a, b in zip(y, x)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 4 < sum(flipped) < 28


def test_crop_is_a_translation_with_zero_fill():
    x = torch.rand(16, 2, 8, 8) + 1  # strictly positive, so shifted-in zeros are visible
    y = _only("crop")(x, 4)
    shifts = []
    for a, b in zip(y, x):
        found = []
        for dx in range(-1, 2):  # 12.5% of 8 px
            for dy in range(-1, 2):
                ref = torch.zeros_like(b)
                # out[i, j] = in[i + dx, j + dy], zeros outside
                src = b[:, max(dx, 0) : 8 + min(dx, 0), max(dy, 0) : 8 + min(dy, 0)]
                ref[:, max(-dx, 0) : 8 + min(-dx, 0), max(-dy, 0) : 8 + min(-dy, 0)] = src
                if torch.equal(a, ref):
                    found.append((dx, dy))
        assert len(found) == 1
        shifts.append(found[0])
    # both axes move, in both directions, independently per image
    assert {dx for dx, _ in shifts} == {-1, 0, 1} and {dy for _, dy in shifts} == {-1, 0, 1}


def test_cutout_zeroes_a_half_size_square():
    x = torch.rand(16, 3, 8, 8) + 1
    y = _only("cutout")(x, 2)
    holes = (y == 0).all(1)  # (N, H, W): a hole covers every channel
    assert torch.equal(y == 0, holes.unsqueeze(1).expand_as(y))
    for hole, a, b in zip(holes, y, x):
        rows = hole.any(1).nonzero().flatten()
        cols = hole.any(0).nonzero().flatten()
        # the square may be clipped at the border, never larger than 4x4, always a full rectangle
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4
        assert hole.sum() == len(rows) * len(cols)
        assert torch.equal(a[:, ~hole], b[:, ~hole])
    assert (holes.flatten(1).sum(1) == 16).any()


def test_color_parameters_in_range():
    x = _x(n=64, c=3)
    y = _only("color")(x, 8)
    # the global mean moves by the brightness shift only (saturation and contrast keep means): |shift| <= 0.5
    shift = y.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))
    assert shift.abs().max() <= 0.5 + 1e-5
    assert shift.abs().max() > 0.2  # and it is really drawn


@pytest.mark.parametrize("op", ["scale", "rotate"])
def test_affine_ops_keep_a_constant_image_inside(op):
    # A constant image stays constant near the centre (the grid only moves pixels around).
    x = torch.full((4, 1, 9, 9), 2.0)
    y = _only(op)(x, 3)
    assert_close(y[:, :, 4, 4], torch.full((4, 1), 2.0))


@pytest.mark.parametrize("op", OPS)
def test_a_split_batch_is_augmented_like_the_whole(op):
    """Under data parallel each rank augments its rows with the whole batch's draws: the parts concatenate to the whole."""
    x = _x(n=9, side=8)
    whole = dsa(x, 5, ops=(op,))
    parts = [dsa(x[lo:hi], 5, ops=(op,), part=(lo, 9)) for lo, hi in ((0, 5), (5, 9))]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(dsa(x, 5, ops=(op,), part=(0, 9)), whole)


@pytest.mark.parametrize("seed", range(12))
def test_mixed_with_drawn_weights_is_dsa_bit_for_bit_with_derivatives(seed):
    """dsa_mixed(draw_all(seed)) runs every family and keeps one: value, gradient and second derivative equal dsa's."""
    x0 = _x(n=5, c=3, side=8, seed=seed)
    ct = torch.randn_like(x0)

    def first_and_second(fn):
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        (gx,) = torch.autograd.grad((y * ct).sum() + (y * y).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * ct).sum(), x)
        return y.detach(), gx.detach(), ggx

    weights, params = augment.dsa_draw_all(x0, seed)
    assert weights.sum() == 1 and weights[OPS.index(OPS[random.Random(seed).randrange(len(OPS))])] == 1
    for want, got in zip(
        first_and_second(lambda x: dsa(x, seed)),
        first_and_second(lambda x: augment.dsa_mixed(x, weights, params)),
        strict=True,
    ):
        assert torch.equal(want, got)


def test_draw_all_gives_every_family_its_own_numbers_from_the_seed():
    x = _x(n=6, side=8)
    _, params = augment.dsa_draw_all(x, 31)
    for op, p in zip(OPS, params, strict=True):  # each family, applied alone, is dsa restricted to it
        assert torch.equal(augment._APPLY[op](x, *p), dsa(x, 31, ops=(op,)))
    _, other = augment.dsa_draw_all(x, 32)
    assert any(not torch.equal(a, b) for pa, pb in zip(params, other, strict=True) for a, b in zip(pa, pb, strict=True))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_family_returns_row_major_strides(op, channels):
    """The memory layout decides which convolution kernels run: it must not depend on the family drawn."""
    x = torch.randn(4, channels, 9, 7)
    y = _only(op)(x, 2)
    assert y.stride() == torch.empty(y.shape).stride()
