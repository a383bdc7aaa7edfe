"""Expert trajectories on disk: what is saved, and that ExpertSet lets go of its files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dpd_cli.artifacts.experts import ExpertSet, expert_path
from dpd_cli.config.settings import ExpertSettings
from dpd_cli.errors import StorageError
from dpd_cli.io import storage
from dpd_cli.recipes import experts as experts_engine

EPOCHS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny experts, with the parameters seen after every epoch recorded independently of the saving code."""
    seen: dict[int, list[torch.Tensor]] = {}
    nets = []  # kept alive: a freed network's id() could be reused by the next expert's
    real = experts_engine.train_epoch
    mp = pytest.MonkeyPatch()

    def recording(net, *a, **k):
        params = lambda: torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()  # noqa: E731
        if id(net) not in seen:
            nets.append(net)
        rows = seen.setdefault(id(net), [])
        if not rows:
            rows.append(params())  # the initialisation, before the first epoch
        out = real(net, *a, **k)
        rows.append(params())
        return out

    mp.setattr(experts_engine, "train_epoch", recording)
    try:
        folder = tmp_path_factory.mktemp("experts") / "ex"
        s = ExpertSettings(
            num=2, epochs=EPOCHS, width=8, depth=2, train_per_class=20, threads=1, device="cpu", out=folder
        )
        experts_engine.run(s)
    finally:
        mp.undo()
    return folder, list(seen.values())


def _mapped(folder: Path) -> int:
    """Memory maps of the folder's expert files in this process."""
    with open("/proc/self/maps") as f:
        return sum(f"{folder}/expert_" in line for line in f)


def test_saved_trajectory_is_every_epochs_parameters(trained):
    folder, recorded = trained
    assert len(recorded) == 2
    for i, rows in enumerate(recorded):
        t, _ = storage.load_tensors(expert_path(folder, i), "dpd.trajectory")
        want = torch.stack(rows)  # (E+1, P)
        assert t["trajectory"].shape == want.shape == (EPOCHS + 1, want.shape[1])
        assert torch.equal(t["trajectory"], want)


def test_expert_set_close_releases_every_file(trained):
    folder, _ = trained
    with ExpertSet(folder) as es:
        start, target = es.pair(1, 0, 2)
        assert _mapped(folder) == 2  # both expert files
    assert _mapped(folder) == 0
    assert torch.equal(target - start, target - start)  # rows read before closing stay valid
    es.close()  # twice is fine


def test_refused_folder_leaves_nothing_open(trained, tmp_path):
    folder = tmp_path / "ex"
    shutil.copytree(trained[0], folder)
    t, meta = storage.load_tensors(folder / "expert_00001.safetensors", "dpd.trajectory")
    reserved = {"format", "format_version", "dpd_version"}
    storage.save_tensors(
        folder / "expert_00001.safetensors",
        {"trajectory": t["trajectory"][:2]},
        "dpd.trajectory",
        {k: v for k, v in meta.items() if k not in reserved},
    )
    del t  # its tensor maps the file it was read from
    with pytest.raises(StorageError, match="trajectory tensor is F32") as info:
        ExpertSet(folder)
    assert info.value.__traceback__ is not None  # which keeps the half-built ExpertSet alive; its files are closed
    assert _mapped(folder) == 0
