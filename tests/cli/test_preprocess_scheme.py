"""Experts folders written with dpd 0.1's preprocessing (ZCA on normalised pixels) are refused, not mixed."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import TINY

DISTILL = [
    "--ipc",
    "1",
    "--iterations",
    "1",
    "--syn-steps",
    "2",
    "--max-start-epoch",
    "1",
    "--expert-epochs",
    "1",
    "--lr-img",
    "10",
    "--lr-lr",
    "1e-8",
    *TINY,
]


def _make_old(folder) -> None:
    """Turn a fresh experts folder into one as dpd 0.1 wrote it (no preprocessing scheme recorded)."""
    manifest = json.loads((folder / "experts.json").read_text())
    del manifest["compat"]["preprocess_scheme"]
    (folder / "experts.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("zca", [True, False])
def test_old_folders_refused_only_when_preprocessing_changed(dpd, tmp_path, zca):
    out = tmp_path / "ex"
    flag = "--zca" if zca else "--no-zca"
    r = dpd("experts", "--num", "1", "--epochs", "2", flag, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "experts.json").read_text())["compat"]["preprocess_scheme"] == 2
    _make_old(out)
    d = dpd("distill", "--experts", out, flag, "--out", tmp_path / "run", *DISTILL)
    e = dpd("experts", "--num", "2", "--epochs", "2", flag, "--out", out, *TINY)
    if zca:
        for r in (d, e):
            assert r.exit_code == 2, r.output
            assert "dpd 0.1's preprocessing (ZCA fitted on mean/std-normalised pixels)" in r.output
            assert "Train new experts" in r.output and "Traceback" not in r.output
        assert not (tmp_path / "run" / "synthetic.safetensors").exists()
        assert not (out / "expert_00001.safetensors").exists()
    else:  # nothing changed for un-whitened Fashion-MNIST: the old folder stays usable
        assert d.exit_code == 0, d.output
        assert e.exit_code == 0, e.output


def test_zca_run_stores_identity_normalisation_and_evaluates_with_its_transform(dpd, tmp_path):
    from dpd_cli.artifacts.synthetic import load as load_synthetic

    out = tmp_path / "ex"
    assert dpd("experts", "--num", "1", "--epochs", "2", "--zca", "--out", out, *TINY).exit_code == 0
    r = dpd("distill", "--experts", out, "--zca", "--out", tmp_path / "run", *DISTILL)
    assert r.exit_code == 0, r.output
    t, _ = load_synthetic(tmp_path / "run" / "synthetic.safetensors")
    assert t["norm_mean"].eq(0).all() and t["norm_std"].eq(1).all() and "zca_matrix" in t
