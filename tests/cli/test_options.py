"""The options generated from the settings models: every setting from a flag, the env and a file, in order.

``--print-config`` shows the resolved settings with their sources and exits before any work, so
these tests run every command line in milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from pydantic import Field
from typer.testing import CliRunner

from dpd_cli.cli.app import app
from dpd_cli.config import settings as S
from tests.cli.conftest import TINY

#: Each settings command and how it is typed (with the positional arguments it needs).
COMMANDS = {
    "experts": ["experts"],
    "experts_import": ["experts", "import", "buffers/x.pt"],
    "distill": ["distill"],
    "evaluate": ["evaluate", "runs/x"],
    "export": ["export", "runs/x"],
}


def _toml(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def _print_config(*argv: str, env: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
    """``(values, sources)`` from ``dpd ... --print-config``."""
    r = CliRunner().invoke(app, [*argv, "--print-config"], env=env)
    assert r.exit_code == 0, r.output
    (command,) = _toml(r.stdout)  # the one table: the command's
    sources = {}
    for line in r.stdout.splitlines():
        if line and not line.startswith(("#", "[")):  # name = value  # source
            sources[line.partition(" = ")[0]] = line.rsplit("  # ", 1)[1]
        elif ": not set" in line:  # # name: not set  # source
            sources[line[2:].partition(":")[0]] = line.rsplit("  # ", 1)[1]
    return _toml(r.stdout)[command], sources


def _other_value(s: S.SettingInfo) -> Any:
    """A valid value of setting ``s`` that is not its default, as the settings model stores it."""
    special = {
        "fail_under": 50.0,
        "device": "cpu",
        "dataset": "fashion-mnist",
        "keep_checkpoints": "all",
        "init": "noise",
        "format": "npz",
        "seeds": [3, 1],
    }
    if s.name in special:
        return special[s.name]
    if s.kind == "bool":
        return not s.default
    if s.kind == "int":
        return 2 if s.default in (None, 1) else s.default + 1
    if s.kind == "float":
        return 0.5 if s.default in (None, 0.0) else s.default / 2
    if s.kind == "path":
        return "some dir/x"
    if (
        s.kind == "choice"
    ):  # a setting with one allowed value (experts import's model) keeps it: its source still changes
        return next((c for c in s.choices if c != s.default), s.default)
    if s.kind == "list":
        return list(reversed(s.choices))
    raise AssertionError(f"no test value for {s.kind} setting {s.name}")


def _as_flag(s: S.SettingInfo, value: Any) -> list[str]:
    if s.kind == "bool":
        return [s.flag if value else "--no-" + s.flag[2:]]
    # Allowed values given in upper case: the command line must accept them in any case.
    text = (
        ",".join(map(str, value)).upper()
        if s.kind == "list"
        else str(value).upper()
        if s.kind == "choice"
        else str(value)
    )
    return [s.flag, text]


def _as_env(s: S.SettingInfo, value: Any) -> str:
    return ",".join(map(str, value)) if s.kind == "list" else str(value).lower() if s.kind == "bool" else str(value)


def _as_toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)


# Settings whose other value needs a companion so the settings stay valid.
_NEEDS = {
    "distilled": ["--baseline", "random"],
    "prune_ema_beta": ["--prune-mask", "ema"],
    "label_epoch": ["--soft-labels"],
    "keep_graphs": ["--memory", "low"],
}

CASES = [(c, s) for c in COMMANDS for s in S.setting_infos(S.COMMAND_SETTINGS[c]).values()]


@pytest.mark.parametrize(("command", "s"), CASES, ids=[f"{c}-{s.name}" for c, s in CASES])
def test_every_setting_from_file_env_and_flag_in_order(command, s, tmp_path):
    value = _other_value(s)
    argv = [*COMMANDS[command], *_NEEDS.get(s.name, [])]
    own, shared = S.env_names(command, s.name)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[{command}]\n{s.name} = {_as_toml(value)}\n")

    steps = [([*argv, "--config", str(cfg)], {}, f"file {cfg} [{command}]")]
    if shared:
        steps.append(([*argv, "--config", str(cfg)], {shared: _as_env(s, value)}, f"env {shared}"))
    steps.append(
        (
            [*argv, "--config", str(cfg)],
            {**({shared: _as_env(s, value)} if shared else {}), own: _as_env(s, value)},
            f"env {own}",
        )
    )
    flag = _as_flag(s, value)
    steps.append(([*argv, "--config", str(cfg), *flag], {own: _as_env(s, value)}, f"flag {flag[0]}"))
    for args, env, source in steps:
        values, sources = _print_config(*args, env=env)
        assert sources[s.name] == source, (args, env)
        assert values[s.name] == value, (args, env)


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults(command):
    values, sources = _print_config(*COMMANDS[command], env={})
    for s in S.setting_infos(S.COMMAND_SETTINGS[command]).values():
        assert sources[s.name] == "default" and values.get(s.name) == s.default, s.name


def test_print_config_round_trips_through_the_command_line(tmp_path):
    values, sources = _print_config(
        "distill",
        "--ipc",
        "3",
        "--prune-scope",
        "LAYER",
        "--no-dsa",
        env={"DPD_DISTILL_OUT": "runs/r", "DPD_SEED": "4"},
    )
    assert (sources["ipc"], sources["prune_scope"], sources["dsa"]) == (
        "flag --ipc",
        "flag --prune-scope",
        "flag --no-dsa",
    )
    assert (sources["out"], sources["seed"]) == ("env DPD_DISTILL_OUT", "env DPD_SEED")
    printed = (
        CliRunner()
        .invoke(
            app,
            ["distill", "--ipc", "3", "--prune-scope", "LAYER", "--no-dsa", "--print-config"],
            env={"DPD_DISTILL_OUT": "runs/r", "DPD_SEED": "4"},
        )
        .stdout
    )
    (tmp_path / "p.toml").write_text(printed)
    again, again_sources = _print_config("distill", "--config", str(tmp_path / "p.toml"), env={})
    assert again == values
    assert {again_sources[k] for k in values} == {f"file {tmp_path / 'p.toml'} [distill]"}


def test_print_config_runs_nothing(tmp_path):
    # Without --print-config this would fail at once (exit 2: the data folder does not exist).
    r = CliRunner().invoke(app, ["experts", "--data-dir", str(tmp_path / "nowhere"), "--print-config"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("# `dpd experts` settings") and r.stderr == ""
    assert not (tmp_path / "experts-root").exists()


def test_print_config_reports_bad_settings(tmp_path):
    r = CliRunner().invoke(app, ["evaluate", "runs/x", "--protocol", "mt", "--print-config"])
    assert r.exit_code == 2
    assert "--protocol: unknown protocol 'mt' (did you mean 'mtt'?)" in r.stderr and r.stdout == ""


@pytest.mark.parametrize(
    "argv", [[], ["run"], ["experts"], ["experts", "import"], ["distill"], ["evaluate"], ["inspect"], ["export"]]
)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(argv, flag):
    r = CliRunner().invoke(app, [*argv, flag])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[1].startswith(" Usage: dpd")
    assert max(len(line) for line in lines) <= 80
    assert not any(line.rstrip(" │").endswith("…") for line in lines), "a cell was cut at 80 columns"
    assert "<bool>" not in r.stdout and "['" not in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_setting_with_its_variables(command):
    typed = [a for a in COMMANDS[command] if "/" not in a]  # without the positional arguments
    text = " ".join(CliRunner().invoke(app, [*typed, "--help"]).stdout.replace("│", " ").split())
    for s in S.setting_infos(S.COMMAND_SETTINGS[command]).values():
        own, shared = S.env_names(command, s.name)
        assert s.flag in text and own in text and (shared is None or shared in text), s.name
        for choice in s.choices:
            assert choice in text, (s.name, choice)


def _help_text(*argv: str) -> str:
    return " ".join(CliRunner().invoke(app, [*argv, "--help"]).stdout.replace("│", " ").split())


def test_the_environment_footer_only_under_commands_with_settings():
    for argv in ([], ["experts"], ["experts", "import"], ["distill"], ["evaluate"], ["export"]):
        assert "DPD_<COMMAND>_X" in _help_text(*argv), argv
    for command in ("inspect", "ls", "compare"):  # they take no settings
        assert "DPD_" not in _help_text(command), command


def test_export_help_names_the_files_written():
    text = _help_text("export").replace(" ", "")
    assert text.count("<NN>-<class>/<i>.png") == 2 and "PNGs<class>/" not in text  # --format's help and the example


@pytest.mark.parametrize("command", [["experts"], ["evaluate"], ["distill"]])
def test_host_memory_help_fits_every_command(command):
    text = _help_text(*command)
    help_text = text[text.index("--host-memory") : text.index("--deterministic")]
    assert "CPU allocator" in help_text and "distil" not in help_text


def test_completion_of_allowed_values(monkeypatch):
    env = {"_DPD_COMPLETE": "complete_bash", "COMP_WORDS": "dpd distill --prune-scope ", "COMP_CWORD": "3"}
    r = CliRunner().invoke(app, [], env=env, prog_name="dpd")
    assert r.stdout.split() == ["global", "layer"]
    env |= {"COMP_WORDS": "dpd evaluate x --models convnet,v", "COMP_CWORD": "4"}
    assert CliRunner().invoke(app, [], env=env, prog_name="dpd").stdout.split() == ["convnet,vgg11"]
    # Typer detects the shell from the parent processes, which a detached run (CI's, say) may not have.
    monkeypatch.setattr("typer.completion._get_shell_name", lambda: "bash")
    r = CliRunner().invoke(app, ["--show-completion"], prog_name="dpd")
    assert r.exit_code == 0 and "complete -o default -F _dpd_completion dpd" in r.stdout, (r.output, r.exc_info)


@pytest.fixture
def fresh_caches():
    """Clear the settings module's per-name caches before and after a test that swaps a model."""
    for cached in (S._commands_with, S._is_shared):
        cached.cache_clear()
    yield
    for cached in (S._commands_with, S._is_shared):
        cached.cache_clear()


def test_a_new_field_is_one_declaration(monkeypatch, tmp_path, fresh_caches):
    """A field added to a settings model reaches --help, the flag, the env and the config file."""
    from dpd_cli.cli.distill import _report
    from dpd_cli.cli.options import Command
    from dpd_cli.cli.runner import settings_command

    class WithKnob(S.DistillSettings):
        panel: ClassVar[str] = "Distillation"
        knob_mode: Literal["soft", "hard"] = Field(
            "soft", description="A new knob.", json_schema_extra={"panel": "Pruning"}
        )
        knob_gain: float = Field(1.0, gt=0, description="Its gain.")

    monkeypatch.setitem(S.COMMAND_SETTINGS, "distill", WithKnob)
    import typer

    one = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})
    one.command(cls=Command)(settings_command("distill", report=_report, summary="s", examples=[]))
    one.command("other")(lambda: None)  # two commands: the group keeps the command name in argv
    runner = CliRunner()
    help_text = " ".join(runner.invoke(one, ["distill", "--help"]).stdout.replace("│", " ").split())
    pruning = help_text[help_text.index("─ Pruning") : help_text.index("─ Memory")]
    assert "--knob-mode" in pruning and "soft, hard" in pruning and "DPD_DISTILL_KNOB_MODE or DPD_KNOB_MODE" in pruning
    assert "--knob-gain" in help_text[help_text.index("─ Distillation") : help_text.index("─ Pruning")]

    cfg = tmp_path / "c.toml"
    cfg.write_text("knob_gain = 3.0\n")
    r = runner.invoke(
        one,
        ["distill", "--knob-mode", "HARD", "--config", str(cfg), "--print-config"],
        env={"DPD_DISTILL_KNOB_GAIN": "", "DPD_KNOB_MODE": "soft"},
    )
    assert r.exit_code == 0, r.output
    table = _toml(r.stdout)["distill"]
    assert (table["knob_mode"], table["knob_gain"]) == ("hard", 3.0)
    r = runner.invoke(one, ["distill", "--print-config"], env={"DPD_DISTILL_KNOB_GAIN": "0.5"})
    assert _toml(r.stdout)["distill"]["knob_gain"] == 0.5


def test_help_needs_no_torch():
    code = (
        "import sys; from dpd_cli.cli.app import app; from dpd_cli.models import MODEL_NAMES; "
        "assert MODEL_NAMES == ('convnet', 'resnet18', 'vgg11', 'alexnet'), MODEL_NAMES; "
        "assert 'torch' not in sys.modules, 'importing the CLI imported torch'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""})


def test_the_command_sets_the_host_memory_and_the_recipe_does_not(dpd, monkeypatch, tmp_path):
    """``--host-memory`` is process-wide: the command line applies it before the recipe; the library never does."""
    from dpd_cli.recipes import experts, runtime

    calls = []
    monkeypatch.setattr(runtime, "set_host_memory", lambda mode, device: calls.append((mode, device.type)))
    r = dpd("experts", "--num", "1", "--epochs", "1", "--host-memory", "system", "--out", str(tmp_path / "a"), *TINY)
    assert r.exit_code == 0, r.output
    assert calls == [("system", "cpu")]
    experts.run(
        S.resolve(
            "experts",
            {
                "num": 1,
                "epochs": 1,
                "out": str(tmp_path / "b"),
                "width": 8,
                "depth": 2,
                "train_per_class": 20,
                "threads": 1,
            },
        )
    )
    assert calls == [("system", "cpu")]
