"""A distillation that diverges: the advice it gives is run exactly, and the change of settings is recorded."""

from __future__ import annotations

import json
import math

from tests.cli.conftest import DISTILL_TINY, TINY

#: DISTILL_TINY without its --lr-img, which each command here gives.
_TINY = [a for i, a in enumerate(DISTILL_TINY) if "--lr-img" not in DISTILL_TINY[max(i - 1, 0) : i + 1]]


def test_the_advice_after_a_divergence_works_and_the_change_is_recorded(dpd, experts, tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--experts", experts, "--out", run, *_TINY, *TINY]
    r = dpd(*args, "--lr-img", "inf")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert (
        "Error: Distillation diverged at iteration 2: loss became nan. Rerun the same command with a lower --lr-img "
        "(or --lr-lr) and --resume: it continues from the last good checkpoint, ckpt-000000.safetensors, and records "
        "the change (or with --force instead of --resume, to start over)."
    ) in " ".join(r.output.split())

    r = dpd(*args, "--lr-img", "10", "--resume")  # what it says
    assert r.exit_code == 0, r.output
    assert (
        f"Resuming {run} from ckpt-000000.safetensors (iteration 0), 1 iteration redone (1): the run had got to "
        "iteration 1, past its newest checkpoint."
    ) in " ".join(r.output.split())
    assert "--lr-img changes from inf to 10 after iteration 0." in r.output
    record = json.loads((run / "settings.json").read_text())
    assert record["settings"]["lr_img"] == math.inf  # what the run started with
    assert record["changes"] == [{"iteration": 0, "setting": "lr_img", "from": math.inf, "to": 10.0}]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4]
    assert lines[0]["changed"] == {"lr_img": {"from": math.inf, "to": 10.0}}
    assert all("changed" not in x for x in lines[1:])

    r = dpd("inspect", run)
    assert r.exit_code == 0, r.output
    assert "changed --lr-img inf → 10 after iteration 0" in " ".join(r.output.split())
    assert json.loads(dpd("inspect", run, "--json").stdout)["changes"] == record["changes"]
    r = dpd("ls", tmp_path, "--json")
    assert [(e["state"], e["problems"]) for e in json.loads(r.stdout)["entries"] if e["kind"] == "run"] == [
        ("finished", [])
    ]

    # Resumed again from its last checkpoint with the same value: nothing changes, the record stays.
    r = dpd(*args, "--lr-img", "10", "--resume", "--iterations", "6")
    assert r.exit_code == 0, r.output
    assert "changes from" not in r.output
    assert json.loads((run / "settings.json").read_text())["changes"] == record["changes"]
    # Other settings still may not change.
    r = dpd(*args, "--lr-img", "10", "--resume", "--iterations", "6", "--seed", "3")
    assert r.exit_code == 2 and "was started with other settings (--seed: the run has 0, settings give 3)" in r.output

    # The other way it offers: --force instead of --resume starts over.
    r = dpd(*args, "--lr-img", "10", "--force")
    assert r.exit_code == 0, r.output
    record = json.loads((run / "settings.json").read_text())
    assert record["settings"]["lr_img"] == 10.0 and "changes" not in record
