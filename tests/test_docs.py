"""The Python examples in docs/api.md run as written."""

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
