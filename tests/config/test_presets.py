"""Every preset in examples/ resolves for every command, and its first line is the command that runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dpd_cli.config.settings import resolve

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STUDIES = sorted(p for p in EXAMPLES.glob("*.toml") if "\n[study]" in p.read_text())
PRESETS = sorted(set(EXAMPLES.glob("*.toml")) - set(STUDIES))
assert len(PRESETS) >= 10, f"the presets are missing from {EXAMPLES}"  # a moved test must not pass on nothing


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"quick", "cifar10-ipc10", "fashion-mnist-cpu", "cifar10-jpeg-cpu"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_resolves_and_documents_its_command(preset: Path, tmp_path: Path):
    env = {"DPD_DATA_DIR": str(tmp_path)}  # imagefolder presets need a data_dir; others accept one
    settings = {c: resolve(c, {}, preset, env=env) for c in ("experts", "distill", "evaluate")}
    first = preset.read_text().splitlines()[0]
    assert first.startswith("# ") and "dpd experts" in first and "dpd distill" in first
    assert f"examples/{preset.name}" in first
    evaluated = re.search(r"dpd evaluate (\S+)", first)
    assert evaluated, first
    assert Path(evaluated.group(1)) == Path(settings["distill"].out)
    assert 0 <= settings["distill"].prune_ratio < 1
    assert settings["experts"].dataset == settings["distill"].dataset


@pytest.mark.parametrize("config", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_config_loads_and_documents_its_command(config: Path):
    from dpd_cli.recipes import study

    s = study.load(config)
    assert config.read_text().splitlines()[0] == f"# dpd study examples/{config.name}"
    assert s.plan.baseline in s.plan.variants and len(s.plan.seeds) >= 3
