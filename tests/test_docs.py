"""The documentation holds: docs/api.md's examples run as written, links between pages resolve, the guide lists every option."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("distilled ") and out[1].startswith("random ") and out[2].startswith("test accuracy ")
    assert [line.split()[0] for line in out[3:]] == ["1", "2", "3"]
    assert (tmp_path / "api-demo" / "steps" / "checkpoints" / "ckpt-000003.safetensors").exists()


ROOT = Path(__file__).resolve().parents[1]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_link_between_documents_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                slugs = {
                    _slug(h)
                    for h in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), re.M)
                }
                if anchor not in slugs:
                    broken.append(f"{page.name}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_the_guide_documents_every_option():
    from dpd_cli.config.settings import DistillSettings, EvalSettings, ExpertSettings

    guide = (ROOT / "docs" / "guide.md").read_text()
    shared = guide[guide.index("Options shared by") : guide.index("### `dpd experts`")]
    missing = []
    for command, settings in (("experts", ExpertSettings), ("distill", DistillSettings), ("evaluate", EvalSettings)):
        start = guide.index(f"### `dpd {command}`")
        section = guide[start : guide.index("\n### ", start + 1)]
        missing += [
            f"dpd {command} --{name.replace('_', '-')}"
            for name in settings.model_fields
            if f"--{name.replace('_', '-')}" not in section + shared
        ]
    assert not missing, f"options missing from docs/guide.md: {missing}"


class _Parsed(Exception):
    pass


def _benchmark_commands() -> list[tuple[str, str, list[str]]]:
    """Every ``python benchmarks/X.py ...`` command the docs give: (page, script, arguments)."""
    import shlex

    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]:
        text = page.read_text().replace("\\\n", " ")
        for m in re.finditer(r"python3? benchmarks/(\w+)\.py([^`\n]*)", text):
            args = re.sub(r"\[[^\]]*\]", "", m.group(2)).split("#")[0]  # [optional parts] and comments out
            found.append((page.name, m.group(1), shlex.split(args)))
    return found


def test_every_benchmark_command_in_the_docs_parses(monkeypatch):
    """Each one's flags are accepted by the script's own parser (the script stops right after parsing)."""
    import argparse
    import importlib.util
    import sys

    commands = _benchmark_commands()
    assert len(commands) >= 15
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    bad = []
    for page, script, args in commands:
        spec = importlib.util.spec_from_file_location(f"doc_{script}", ROOT / "benchmarks" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
        try:
            module.main()
        except _Parsed:
            continue
        except SystemExit as e:
            bad.append(f"{page}: benchmarks/{script}.py {' '.join(args)} (exit {e.code})")
    assert not bad, "\n".join(bad)
