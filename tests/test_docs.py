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
                slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), re.M)}
                if anchor not in slugs:
                    broken.append(f"{page.name}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_the_guide_documents_every_option():
    from dpd_cli.config.settings import DistillSettings, EvalSettings, ExpertSettings

    guide = (ROOT / "docs" / "guide.md").read_text()
    shared = guide[guide.index("Options shared by"):guide.index("### `dpd experts`")]
    missing = []
    for command, settings in (("experts", ExpertSettings), ("distill", DistillSettings), ("evaluate", EvalSettings)):
        start = guide.index(f"### `dpd {command}`")
        section = guide[start:guide.index("\n### ", start + 1)]
        missing += [f"dpd {command} --{name.replace('_', '-')}" for name in settings.model_fields
                    if f"--{name.replace('_', '-')}" not in section + shared]
    assert not missing, f"options missing from docs/guide.md: {missing}"
