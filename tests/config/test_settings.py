"""Settings resolution: defaults < config file < DPD_* env < flags, strict keys, all errors at once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpd_cli.config.settings import (
    OTHER_ENV,
    DistillSettings,
    EvalSettings,
    ExpertSettings,
    env_names,
    env_var,
    resolve,
    resolve_sources,
    settings_hash,
    to_toml,
)
from dpd_cli.errors import SettingsError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _error(command: str, flags=None, config=None, env=None) -> str:
    with pytest.raises(SettingsError) as info:
        resolve(command, flags or {}, config=config, env=env if env is not None else {})
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# Precedence


def test_defaults_when_nothing_given():
    s = resolve("distill", {}, env={})
    assert isinstance(s, DistillSettings)
    assert s == DistillSettings()
    assert (s.ipc, s.prune_ratio, s.dataset, s.memory) == (10, 0.01, "fashion-mnist-mini", "full")


def test_env_var_names():
    assert env_var("prune_ratio") == "DPD_PRUNE_RATIO"
    assert env_var("ipc") == "DPD_IPC"


def test_precedence_defaults_file_env_flags(tmp_path):
    cfg = _write(
        tmp_path / "c.toml",
        "ipc = 3\nseed = 4\nsyn_steps = 7\nlr_img = 5.0\niterations = 9\n[distill]\nipc = 4\nseed = 5\n",
    )
    # file only: the [distill] table wins over the top-level key
    s = resolve("distill", {}, config=cfg, env={})
    assert (s.ipc, s.seed, s.syn_steps, s.lr_img, s.iterations) == (4, 5, 7, 5.0, 9)
    # env beats the file (both its top level and its table)
    env = {"DPD_IPC": "6", "DPD_SYN_STEPS": "8"}
    s = resolve("distill", {}, config=cfg, env=env)
    assert (s.ipc, s.seed, s.syn_steps, s.lr_img) == (6, 5, 8, 5.0)
    # flags beat env; None means "flag not given"
    s = resolve("distill", {"ipc": 2, "syn_steps": None, "lr_img": 1.5}, config=cfg, env=env)
    assert (s.ipc, s.seed, s.syn_steps, s.lr_img) == (2, 5, 8, 1.5)
    # untouched fields keep their defaults
    assert s.prune_ratio == DistillSettings().prune_ratio


def test_table_of_another_command_does_not_apply(tmp_path):
    cfg = _write(tmp_path / "c.toml", "seed = 1\n[experts]\nseed = 9\nepochs = 3\n[distill]\nipc = 2\n")
    d = resolve("distill", {}, config=cfg, env={})
    e = resolve("experts", {}, config=cfg, env={})
    assert (d.seed, d.ipc) == (1, 2)
    assert (e.seed, e.epochs) == (9, 3)


def test_top_level_key_of_another_command_is_ignored(tmp_path):
    # ipc belongs to distill only; experts must accept the shared file and ignore it.
    cfg = _write(tmp_path / "c.toml", "ipc = 3\nepochs = 4\n")
    e = resolve("experts", {}, config=cfg, env={})
    assert e.epochs == 4 and not hasattr(e, "ipc")


def test_dashed_keys_in_file(tmp_path):
    cfg = _write(tmp_path / "c.toml", 'prune-ratio = 0.2\n[distill]\nprune-scope = "layer"\n')
    s = resolve("distill", {}, config=cfg, env={})
    assert (s.prune_ratio, s.prune_scope) == (0.2, "layer")


def test_empty_env_value_is_ignored():
    s = resolve("distill", {}, env={"DPD_IPC": ""})
    assert s.ipc == 10


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("DPD_PRUNE_RATIO", "0.25")
    assert resolve("distill", {}).prune_ratio == 0.25


def test_env_bool_and_path(tmp_path):
    s = resolve("distill", {}, env={"DPD_ZCA": "true", "DPD_DISTILL_OUT": str(tmp_path / "run")})
    assert s.zca is True and s.out == tmp_path / "run"


def test_json_and_yaml_files(tmp_path):
    j = _write(tmp_path / "c.json", json.dumps({"ipc": 3, "distill": {"prune_ratio": 0.1}}))
    y = _write(tmp_path / "c.yaml", "ipc: 5\ndistill:\n  prune_ratio: 0.2\n  prune_scope: layer\n")
    s = resolve("distill", {}, config=j, env={})
    assert (s.ipc, s.prune_ratio) == (3, 0.1)
    s = resolve("distill", {}, config=y, env={})
    assert (s.ipc, s.prune_ratio, s.prune_scope) == (5, 0.2, "layer")


def test_empty_yaml_file_is_defaults(tmp_path):
    y = _write(tmp_path / "c.yml", "")
    assert resolve("distill", {}, config=y, env={}) == DistillSettings()


# ----------------------------------------------------------------------------------------------
# Unknown keys and tables


def test_unknown_keys_and_tables_all_reported(tmp_path):
    cfg = _write(tmp_path / "c.toml", "ipc = 3\nprune_ratoi = 0.1\n[distil]\nx = 1\n[distill]\nipcc = 2\n")
    msg = _error("distill", config=cfg)
    assert msg == (
        f"Config file {cfg}: unknown key 'prune_ratoi' (did you mean 'prune_ratio'?); "
        "unknown table [distil] (did you mean 'distill'?); tables: experts, experts_import, distill, evaluate, export, study; "
        "unknown key 'ipcc' in [distill] (did you mean 'ipc'?). Run `dpd distill --help` for the valid settings."
    )


def test_key_of_another_command_inside_table_is_an_error(tmp_path):
    cfg = _write(tmp_path / "c.toml", "[experts]\nipc = 3\n")
    msg = _error("experts", config=cfg)
    assert "unknown key 'ipc' in [experts]" in msg


def test_unknown_flag_is_an_error():
    assert _error("experts", flags={"ipc": 3}) == "Unknown setting 'ipc' for `dpd experts`."


def test_missing_config_file(tmp_path):
    msg = _error("distill", config=tmp_path / "nope.toml")
    assert msg == f"Config file {tmp_path / 'nope.toml'} does not exist. Check the --config path."


def test_non_table_file(tmp_path):
    j = _write(tmp_path / "c.json", "[1, 2]")
    assert "must hold a table of settings" in _error("distill", config=j)


# ----------------------------------------------------------------------------------------------
# Syntax errors


def test_toml_syntax_error_names_the_line(tmp_path):
    cfg = _write(tmp_path / "c.toml", "ipc = 3\nseed = = 1\n")
    msg = _error("distill", config=cfg)
    assert msg.startswith(f"Config file {cfg} has a syntax error")
    assert "line 2" in msg


def test_yaml_syntax_error_names_the_line(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "ipc: 3\nseed: [1\n")
    msg = _error("distill", config=cfg)
    assert msg.startswith(f"Config file {cfg} has a syntax error (line 3, column 1)")


def test_json_syntax_error_names_the_line(tmp_path):
    cfg = _write(tmp_path / "c.json", '{\n  "ipc": 3,\n}\n')
    msg = _error("distill", config=cfg)
    assert msg.startswith(f"Config file {cfg} is not valid JSON")
    assert "line 3" in msg


# ----------------------------------------------------------------------------------------------
# Value errors


def test_range_errors_reported_at_once_naming_flags():
    msg = _error("distill", flags={"ipc": 0, "prune_ratio": 1.0, "iterations": 0})
    assert msg == (
        "Invalid settings for `dpd distill`: "
        "--ipc: Input should be greater than or equal to 1 (got 0); "
        "--iterations: Input should be greater than or equal to 1 (got 0); "
        "--prune-ratio: Input should be less than 1 (got 1.0). See `dpd distill --help`."
    )


def test_negative_prune_ratio():
    msg = _error("distill", flags={"prune_ratio": -0.1})
    assert "--prune-ratio: Input should be greater than or equal to 0 (got -0.1)" in msg


def test_nan_is_refused_with_the_range_allowed():
    assert "--prune-ratio: must be a number in [0, 1) (got nan)" in _error(
        "distill", flags={"prune_ratio": float("nan")}
    )
    assert "env DPD_LR_IMG: must be a number above 0 (got 'NaN')" in _error("distill", env={"DPD_LR_IMG": "NaN"})
    assert "--fail-under: must be a number in [0, 100] (got nan)" in _error(
        "evaluate", flags={"fail_under": float("nan")}
    )


def test_zero_epochs():
    msg = _error("experts", flags={"epochs": 0})
    assert "--epochs: Input should be greater than or equal to 1 (got 0)" in msg
    msg = _error("evaluate", flags={"epochs": 0})
    assert "--epochs: Input should be greater than or equal to 1 (got 0)" in msg


def test_errors_name_the_source(tmp_path):
    cfg = _write(tmp_path / "c.toml", "iterations = 0\n")
    msg = _error("distill", config=cfg, env={"DPD_IPC": "0"})
    assert "env DPD_IPC: Input should be greater than or equal to 1 (got '0')" in msg
    assert "config key 'iterations': Input should be greater than or equal to 1 (got 0)" in msg


def test_resume_with_force_is_refused():
    msg = _error("distill", flags={"resume": True, "force": True})
    assert "can't use both --resume and --force" in msg
    # either one alone is fine
    assert resolve("distill", {"resume": True}, env={}).resume
    assert resolve("distill", {"force": True}, env={}).force


def test_prune_warmup_must_leave_pruned_iterations():
    assert "--prune-warmup 5 leaves no pruned iteration of 5" in _error(
        "distill", flags={"prune_warmup": 5, "iterations": 5}
    )
    # no pruning at all: any warmup is fine
    assert resolve("distill", {"prune_warmup": 5, "iterations": 5, "prune_ratio": 0.0}, env={}).prune_ratio == 0


def test_unknown_dataset_suggests():
    msg = _error("experts", flags={"dataset": "cifar1O"})
    assert "unknown dataset 'cifar1o' (did you mean 'cifar10'?)" in msg


def test_imagefolder_needs_data_dir(tmp_path):
    assert "dataset 'imagefolder' needs --data-dir" in _error("experts", flags={"dataset": "imagefolder"})
    s = resolve("experts", {"dataset": "imagefolder", "data_dir": str(tmp_path)}, env={})
    assert isinstance(s, ExpertSettings) and s.data_dir == tmp_path


def test_device_forms():
    assert resolve("experts", {"device": "CUDA:1"}, env={}).device == "cuda:1"
    assert "unknown device 'gpu'" in _error("experts", flags={"device": "gpu"})


# ----------------------------------------------------------------------------------------------
# EvalSettings


def test_models_comma_splitting():
    s = resolve("evaluate", {"models": "convnet, VGG11,,alexnet"}, env={})
    assert isinstance(s, EvalSettings)
    assert s.models == ["convnet", "vgg11", "alexnet"]
    assert resolve("evaluate", {}, env={"DPD_MODELS": "resnet18,convnet"}).models == ["resnet18", "convnet"]
    assert resolve("evaluate", {"baseline": "random,full"}, env={}).baseline == ["random", "full"]


def test_models_unknown_and_empty():
    assert "unknown model 'convnt' (did you mean 'convnet'?)" in _error("evaluate", flags={"models": "convnt"})
    assert "give at least one model" in _error("evaluate", flags={"models": " , "})


def test_models_from_file_list(tmp_path):
    cfg = _write(tmp_path / "c.toml", '[evaluate]\nmodels = ["alexnet", "convnet"]\n')
    assert resolve("evaluate", {}, config=cfg, env={}).models == ["alexnet", "convnet"]


# ----------------------------------------------------------------------------------------------


def test_settings_are_frozen_and_hash_is_stable():
    a = resolve("distill", {"ipc": 2}, env={})
    b = resolve("distill", {"ipc": 2}, env={})
    c = resolve("distill", {"ipc": 3}, env={})
    with pytest.raises(Exception):
        a.ipc = 5  # type: ignore[misc]
    assert settings_hash(a) == settings_hash(b) != settings_hash(c)
    assert settings_hash(a, exclude={"ipc"}) == settings_hash(c, exclude={"ipc"})


# ----------------------------------------------------------------------------------------------
# Environment: command-scoped names, shared names, DPD_CONFIG


def test_command_variable_beats_shared_beats_file(tmp_path):
    cfg = _write(tmp_path / "c.toml", "seed = 1\n[distill]\nipc = 2\n")
    env = {"DPD_SEED": "3", "DPD_IPC": "4"}
    s = resolve("distill", {}, config=cfg, env=env)
    assert (s.seed, s.ipc) == (3, 4)  # shared env beats the file, top level and table
    env |= {"DPD_DISTILL_SEED": "5", "DPD_DISTILL_IPC": "6"}
    s = resolve("distill", {}, config=cfg, env=env)
    assert (s.seed, s.ipc) == (5, 6)  # the command's own variable beats the shared one
    assert resolve("distill", {"seed": 7}, config=cfg, env=env).seed == 7  # a flag beats both
    # Another command's variable does not apply.
    assert resolve("experts", {}, env={"DPD_DISTILL_SEED": "5", "DPD_EVALUATE_SEED": "6"}).seed == 0
    assert resolve("experts", {}, env={"DPD_EXPERTS_EPOCHS": "3"}).epochs == 3
    assert resolve("evaluate", {}, env={"DPD_EXPERTS_EPOCHS": "3"}).epochs is None


def test_colliding_names_have_no_shared_variable():
    # A name several commands declare separately; checked against the models, not against env_names.
    by_name: dict[str, set[type]] = {}
    for cls in (ExpertSettings, DistillSettings, EvalSettings):
        for name in cls.model_fields:
            owner = next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
            by_name.setdefault(name, set()).add(owner)
    separate = {n for n, owners in by_name.items() if len(owners) > 1}
    assert separate == {"out", "epochs", "lr", "batch", "momentum", "weight_decay", "dsa", "data_dir", "concurrent"}
    for command, cls in (("experts", ExpertSettings), ("distill", DistillSettings), ("evaluate", EvalSettings)):
        for name in cls.model_fields:
            own, shared = env_names(command, name)
            assert own == f"DPD_{command.upper()}_{name.upper()}"
            # data_dir and concurrent are declared again by evaluate, marked as meaning the same (the dataset's
            # folder; networks trained at once).
            same = {"data_dir", "concurrent"}
            assert shared == (None if name in separate - same else f"DPD_{name.upper()}"), (command, name)


def test_shared_variable_of_a_colliding_setting_is_refused():
    msg = _error("distill", env={"DPD_OUT": "runs/x"})
    assert msg == (
        "Ambiguous environment for `dpd distill`: DPD_OUT is set, but 'out' means different things in `dpd distill`, "
        "`dpd experts`, `dpd experts import` and `dpd export`: set DPD_DISTILL_OUT instead (DPD_EXPERTS_OUT for `dpd experts`, "
        "DPD_EXPERTS_IMPORT_OUT for `dpd experts import`, DPD_EXPORT_OUT for `dpd export`) and unset DPD_OUT."
    )
    # Even next to the command's own variable: one variable must not silently set two things.
    assert "DPD_EPOCHS is set" in _error("experts", env={"DPD_EPOCHS": "3", "DPD_EXPERTS_EPOCHS": "3"})
    msg = _error("evaluate", env={"DPD_EPOCHS": "3", "DPD_DSA": "0"})
    assert "DPD_DSA is set" in msg and "DPD_EPOCHS is set" in msg  # every problem at once
    assert "`dpd evaluate`, `dpd experts`, `dpd experts import` and `dpd distill`" in msg
    # A command without the setting ignores the variable, as it ignores a top-level key it does not have.
    assert resolve("evaluate", {}, env={"DPD_OUT": "runs/x"}).runs == 5
    assert resolve("distill", {}, env={"DPD_OUT": ""}).out is None  # empty counts as unset


def test_variable_names_are_unique_and_avoid_reserved_ones():
    from dpd_cli.config.settings import COMMAND_SETTINGS

    owner: dict[str, set[str]] = {}
    for command, cls in COMMAND_SETTINGS.items():
        for name in cls.model_fields:
            for var in env_names(command, name):
                if var is not None:
                    owner.setdefault(var, set()).add(name)
    assert all(len(fields) == 1 for fields in owner.values()), {v: f for v, f in owner.items() if len(f) > 1}
    reserved = {"DPD_EXPERTS_ROOT", "DPD_DATA_ROOT", "DPD_CACHE_ROOT", "DPD_DEBUG", "DPD_CONFIG"}
    assert set(OTHER_ENV) == reserved and not reserved & set(owner)


def test_unknown_variables_are_errors_with_the_closest_name():
    tail = ". Unset it, or see `dpd distill --help` for each setting's variables."
    for typo, meant in (
        ("DPD_DISTILL_IPCC", "DPD_DISTILL_IPC"),
        ("DPD_ITERATONS", "DPD_ITERATIONS"),
        ("DPD_DISTIL_IPC", "DPD_DISTILL_IPC"),
    ):
        assert _error("distill", env={typo: "3"}) == (
            f"Unknown environment variable for `dpd distill`: {typo} is not a dpd variable "
            f"(did you mean {meant!r}?){tail}"
        )
    msg = _error("evaluate", env={"DPD_RUNZ": "3", "DPD_EVALUATE_LRR": "0.1"})
    assert msg.startswith("Unknown environment variables for `dpd evaluate`: DPD_EVALUATE_LRR is not")
    assert "DPD_RUNZ is not a dpd variable (did you mean 'DPD_RUNS'?)" in msg and "Unset them" in msg
    # Empty counts as unset; another command's variables and those that are not settings are fine.
    assert resolve("distill", {}, env={"DPD_DISTILL_IPCC": ""}).ipc == 10
    other = {"DPD_EXPERTS_EPOCHS": "3", "DPD_EVALUATE_RUNS": "2", **dict.fromkeys(OTHER_ENV, "0")}
    other.pop("DPD_CONFIG")
    assert resolve("distill", {}, env=other).ipc == 10


def test_every_variable_the_code_reads_is_known():
    """A ``DPD_*`` variable read anywhere in dpd_cli is a setting's or listed in ``OTHER_ENV`` (else it is refused)."""
    import dpd_cli

    root = Path(dpd_cli.__file__).parent
    read = {m for f in root.rglob("*.py") for m in re.findall(r'"(DPD_[A-Z_]*[A-Z])"', f.read_text())}
    assert read and read <= set(OTHER_ENV)


def test_dpd_config_names_the_file(tmp_path):
    a = _write(tmp_path / "a.toml", "ipc = 3\n")
    b = _write(tmp_path / "b.toml", "ipc = 4\n")
    r = resolve_sources("distill", {}, env={"DPD_CONFIG": str(a)})
    assert r.settings.ipc == 3 and r.config == a and r.sources["ipc"] == f"file {a}"
    assert resolve("distill", {}, config=b, env={"DPD_CONFIG": str(a)}).ipc == 4  # --config wins
    assert resolve("distill", {}, env={"DPD_CONFIG": ""}).ipc == 10
    msg = _error("distill", env={"DPD_CONFIG": str(tmp_path / "nope.toml")})
    assert msg == f"Config file {tmp_path / 'nope.toml'} does not exist. Check the DPD_CONFIG path."


# ----------------------------------------------------------------------------------------------
# Allowed values


def test_choices_ignore_case_from_every_source(tmp_path):
    cfg = _write(tmp_path / "c.toml", '[distill]\nnorm = "BATCH"\nprune_scope = "Layer"\n')
    s = resolve(
        "distill", {"dataset": "CIFAR10", "memory": "LOW"}, config=cfg, env={"DPD_POOL": "Max", "DPD_MODEL": "VGG11"}
    )
    assert (s.dataset, s.memory, s.norm, s.prune_scope, s.pool, s.model) == (
        "cifar10",
        "low",
        "batch",
        "layer",
        "max",
        "vgg11",
    )
    s = resolve("evaluate", {"protocol": "MTT", "baseline": "Random, FULL", "models": "AlexNet"}, env={})
    assert (s.protocol, s.baseline, s.models) == ("mtt", ["random", "full"], ["alexnet"])


def test_unknown_choice_lists_the_allowed_values():
    msg = _error("evaluate", flags={"protocol": "mt"})
    assert "--protocol: unknown protocol 'mt' (did you mean 'mtt'?); known: mtt, fixed (got 'mt')" in msg
    assert "--baseline: unknown baseline 'rand'" in _error("evaluate", flags={"baseline": "full,rand"})
    assert "--norm: unknown norm 'layer'; known: instance, batch, none" in _error("experts", flags={"norm": "layer"})


def test_fail_under_is_a_percentage():
    msg = _error("evaluate", flags={"fail_under": 0.6})
    assert "--fail-under: the threshold is a percentage (0-100), and 0.6 looks like a fraction: for 60 % give 60" in msg
    assert "looks like a fraction" in _error("evaluate", flags={"fail_under": 1})
    for ok in (0, 1.5, 60, 100):
        assert resolve("evaluate", {"fail_under": ok}, env={}).fail_under == ok


# ----------------------------------------------------------------------------------------------
# --print-config


def _toml(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def test_print_config_round_trips_with_sources(tmp_path):
    data = tmp_path / 'odd "dir" \\ ü'
    cfg = _write(
        tmp_path / "c.toml", f'width = 16\n[distill]\nprune_scope = "layer"\ndata_dir = "{tmp_path.as_posix()}"\n'
    )
    env = {"DPD_SEED": "3", "DPD_DISTILL_LR_LR": "2.5e-07", "DPD_ZCA": "true"}
    flags = {"ipc": 2, "prune_ratio": 0.125, "data_dir": str(data), "out": "runs/x"}
    r = resolve_sources("distill", flags, config=cfg, env=env)
    text = to_toml(r)
    table = _toml(text)["distill"]
    dumped = r.settings.model_dump(mode="json")
    assert table == {k: v for k, v in dumped.items() if v is not None}  # unset (None) settings are comments
    expected = {
        "ipc": "flag --ipc",
        "prune_ratio": "flag --prune-ratio",
        "data_dir": "flag --data-dir",
        "out": "flag --out",
        "seed": "env DPD_SEED",
        "lr_lr": "env DPD_DISTILL_LR_LR",
        "zca": "env DPD_ZCA",
        "width": f"file {cfg}",
        "prune_scope": f"file {cfg} [distill]",
    }
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key = line.split("=")[0].strip()
            assert line.rsplit("# ", 1)[1] == expected.get(key, "default"), line
    assert "# depth: not set" in text
    # Fed back as the config file, the printed settings give the same settings.
    again = _write(tmp_path / "printed.toml", text)
    assert resolve("distill", {}, config=again, env={}) == r.settings
    assert resolve_sources("distill", {}, config=again, env={}).sources["ipc"] == f"file {again} [distill]"


@pytest.mark.parametrize("command", ["experts", "distill", "evaluate"])
def test_print_config_of_defaults_round_trips(command, tmp_path):
    r = resolve_sources(command, {}, env={})
    assert set(r.sources.values()) == {"default"}
    again = _write(tmp_path / "printed.toml", to_toml(r))
    assert resolve(command, {}, config=again, env={}) == r.settings
