"""Normalisation and ZCA whitening: values against a numpy reference, round trips, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpd_cli.data import Preprocess, fit_zca
from dpd_cli.data.preprocess import ZCA_EPS
from tests.helpers import assert_close


def _pixels(n=64, c=3, side=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Correlated channels so whitening has something to undo.
    base = torch.randint(0, 200, (n, 1, side, side), generator=g)
    noise = torch.randint(0, 56, (n, c, side, side), generator=g)
    return (base + noise).to(torch.uint8)


def _pre(c=3) -> Preprocess:
    return Preprocess(torch.linspace(0.3, 0.5, c), torch.linspace(0.2, 0.3, c))


def _with_zca(pre: Preprocess, pixels: torch.Tensor, eps: float = ZCA_EPS) -> Preprocess:
    pre.zca_mean, pre.zca_matrix, pre.zca_inverse = fit_zca(pre.normalize(pixels), eps)
    return pre


def test_normalize_values():
    pre = _pre()
    px = _pixels(n=4)
    x = pre.normalize(px)
    assert x.dtype == torch.float32 and x.shape == px.shape
    ref = (px.double() / 255 - pre.mean.double().view(1, -1, 1, 1)) / pre.std.double().view(1, -1, 1, 1)
    assert_close(x, ref.float())


def test_normalize_invert_round_trip():
    pre = _pre()
    px = _pixels(n=8)
    back = pre.invert(pre.apply(px))
    assert back.min() >= 0 and back.max() <= 1
    assert_close(back, px.float() / 255, atol=1e-6, rtol=0)


def test_invert_clamps():
    pre = _pre(1)
    x = torch.full((1, 1, 2, 2), 100.0)
    assert torch.equal(pre.invert(x), torch.ones(1, 1, 2, 2))


def test_apply_in_chunks_equals_one_chunk():
    pre = _with_zca(_pre(), _pixels())
    px = _pixels(n=10, seed=3)
    assert_close(pre.apply(px, batch=3), pre.apply(px, batch=4096), atol=1e-6, rtol=0)


def test_apply_empty_batch():
    pre = _pre()
    out = pre.apply(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))
    assert out.shape == (0, 3, 4, 4)


def test_fit_zca_matches_numpy_reference():
    x = _pre().normalize(_pixels())
    mean, w, w_inv = fit_zca(x)
    flat = x.flatten(1).double().numpy()
    mu = flat.mean(0)
    cov = (flat - mu).T @ (flat - mu) / (flat.shape[0] - 1)
    s, u = np.linalg.eigh(cov)
    s = np.clip(s, 0, None)
    ref_w = u @ np.diag(1 / np.sqrt(s + ZCA_EPS)) @ u.T
    ref_inv = u @ np.diag(np.sqrt(s + ZCA_EPS)) @ u.T
    assert mean.dtype == w.dtype == w_inv.dtype == torch.float32
    assert_close(mean.double(), torch.from_numpy(mu), atol=1e-6, rtol=1e-6)
    assert_close(w.double(), torch.from_numpy(ref_w), atol=1e-5, rtol=1e-5)
    assert_close(w_inv.double(), torch.from_numpy(ref_inv), atol=1e-5, rtol=1e-5)
    assert_close(w.double(), w.double().T, atol=1e-6, rtol=0)  # symmetric
    assert_close(w.double() @ w_inv.double(), torch.eye(w.shape[0], dtype=torch.float64), atol=1e-4, rtol=0)


def test_zca_whitens():
    pre = _with_zca(_pre(), _pixels(n=200))
    z = pre.apply(_pixels(n=200)).flatten(1).double()
    cov = torch.cov(z.T)
    # With eps the whitened covariance is U diag(S / (S + eps)) U^T: identity on the strong directions,
    # shrunk on the weak ones. Check exactly that, and that off-diagonal correlation is gone.
    x = pre.normalize(_pixels(n=200)).flatten(1).double()
    s, u = torch.linalg.eigh(torch.cov(x.T))
    s = s.clamp_min(0)
    expected = (u * (s / (s + ZCA_EPS))) @ u.T
    assert_close(cov, expected, atol=1e-4, rtol=0)
    # The strong directions really are whitened to unit variance.
    strong = s > 10 * ZCA_EPS
    assert strong.any()
    proj = torch.diagonal(u.T @ cov @ u)
    assert_close(proj[strong], torch.ones(int(strong.sum()), dtype=torch.float64), atol=0.1, rtol=0)
    assert z.mean(0).abs().max() < 1e-4


def test_zca_apply_invert_round_trip():
    px = _pixels()
    pre = _with_zca(_pre(), px)
    back = pre.invert(pre.apply(px))
    assert_close(back, px.float() / 255, atol=1e-4, rtol=0)


def test_tensors_from_tensors_round_trip():
    px = _pixels()
    plain = _pre()
    zca = _with_zca(_pre(), px)
    for pre in (plain, zca):
        t = pre.tensors()
        assert all(v.dtype == torch.float32 and v.is_contiguous() for v in t.values())
        assert set(t) == (
            {"norm_mean", "norm_std", "zca_mean", "zca_matrix", "zca_inverse"}
            if pre.has_zca
            else {"norm_mean", "norm_std"}
        )
        again = Preprocess.from_tensors(t)
        assert again.has_zca == pre.has_zca
        assert torch.equal(again.apply(px), pre.apply(px))
        assert again.fingerprint() == pre.fingerprint()


def test_tensors_survive_storage(tmp_path):
    from dpd_cli.io import storage

    px = _pixels()
    pre = _with_zca(_pre(), px)
    storage.save_tensors(tmp_path / "p.safetensors", pre.tensors(), "dpd.preprocess")
    t, _ = storage.load_tensors(tmp_path / "p.safetensors", "dpd.preprocess")
    assert torch.equal(Preprocess.from_tensors(t).apply(px), pre.apply(px))


def test_fingerprint_equal_and_different():
    px = _pixels()
    a, b = _pre(), _pre()
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16
    c = Preprocess(a.mean + 1e-3, a.std)
    assert c.fingerprint() != a.fingerprint()
    d = Preprocess(a.mean, a.std.flip(0))
    assert d.fingerprint() != a.fingerprint()
    za, zb = _with_zca(_pre(), px), _with_zca(_pre(), px)
    assert za.fingerprint() == zb.fingerprint() != a.fingerprint()
    zc = _with_zca(_pre(), _pixels(seed=5))
    assert zc.fingerprint() != za.fingerprint()
    zd = _with_zca(_pre(), px, eps=0.5)
    assert zd.fingerprint() != za.fingerprint()


# --- MTT's preprocessing: ZCA on raw [0, 1] pixels, no normalisation --------------------------
def _rgb_dataset(n=300, side=6, seed=0):
    from dpd_cli.data import Dataset

    px = _pixels(n=n, c=3, side=side, seed=seed)
    labels = torch.arange(n) % 3
    return Dataset(
        "cifar10", ["a", "b", "c"], px, labels, px[:10], labels[:10], (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    )


def _zca_reference_float64(pixels: torch.Tensor, eps: float = ZCA_EPS):
    """ZCA from its definition, in float64 numpy, on pixels / 255 with nothing subtracted or divided first."""
    x = pixels.double().numpy().reshape(len(pixels), -1) / 255.0
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / (len(x) - 1)
    u, s, _ = np.linalg.svd(cov)  # kornia's route (SVD of the covariance)
    w = u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T
    return mu, w


def test_zca_fitted_on_raw_pixels_without_normalisation():
    from dpd_cli.recipes.runtime import build_preprocess

    ds = _rgb_dataset()
    pre = build_preprocess(ds, zca=True)
    # The stored normalisation is the identity, so the documented mapping ZCA((p/255 - mean)/std) holds.
    assert torch.equal(pre.mean, torch.zeros(3)) and torch.equal(pre.std, torch.ones(3))
    mu, w = _zca_reference_float64(ds.train_images)
    test = ds.test_images
    expected = (test.double().numpy().reshape(len(test), -1) / 255.0 - mu) @ w
    assert_close(pre.apply(test).flatten(1).double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    assert_close(pre.zca_mean.double(), torch.from_numpy(mu), rtol=1e-6, atol=1e-7)


def test_zca_agrees_with_kornia_zca_whitening():
    kornia = pytest.importorskip("kornia")
    from dpd_cli.recipes.runtime import build_preprocess

    ds = _rgb_dataset()
    pre = build_preprocess(ds, zca=True)
    raw = ds.train_images.float() / 255  # what MTT's ToTensor() gives
    zca = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(raw)
    ours, theirs = pre.apply(ds.test_images), zca(ds.test_images.float() / 255)
    # kornia fits in float32 and dpd in float64: equal to float32 rounding of a well-conditioned map.
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert_close(pre.invert(ours), zca.inverse_transform(theirs).clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_zca_regularises_as_mtt_not_as_normalised_input():
    """The same eps on normalised pixels regularises less: the fitted maps must differ (this was dpd 0.1's bug)."""
    from dpd_cli.recipes.runtime import build_preprocess

    ds = _rgb_dataset()
    new = build_preprocess(ds, zca=True)
    old = _with_zca(Preprocess(torch.tensor(ds.mean), torch.tensor(ds.std)), ds.train_images)
    assert (new.apply(ds.test_images) - old.apply(ds.test_images)).abs().max() > 0.1


def test_without_zca_the_dataset_constants_normalise():
    from dpd_cli.recipes.runtime import build_preprocess

    ds = _rgb_dataset()
    pre = build_preprocess(ds, zca=False)
    assert not pre.has_zca
    assert_close(pre.mean, torch.tensor(ds.mean)) and assert_close(pre.std, torch.tensor(ds.std))


def test_normalisation_constants_follow_mtt():
    from dpd_cli.data.datasets import NORMALIZATION

    cifar10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert NORMALIZATION["cifar10"] == cifar10
    assert NORMALIZATION["cifar100"] == cifar10  # MTT uses CIFAR-10's constants for CIFAR-100
    assert NORMALIZATION["tiny-imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's
