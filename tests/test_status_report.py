"""Issue 41, status and report: the newest checkpoint's step, one (step, sample count) per table, figures not
drawn named with why, wall time over every session of a run, and one line for a missing folder.

The folder is the user's: a sweep at `train.max_steps=60 eval.num_samples=100` put in `runs/quickstart` beside
the quickstart extended to 600 steps at 500 samples (results.json files written by hand from the real
composed config, as tests/test_like_with_like.py writes them).
"""
import json
import re
import subprocess
import sys

import pytest

from analysis.report import main as report_main
from conftest import ROOT
from ddt.ledger import Ledger
from ddt.status import sweep_status, table
from test_like_with_like import plain, walkthrough, write_run  # noqa: F401  (fixtures: a real composed config)


def with_train(run_dir, **train):
    """Add training numbers (wall time per session and over the run) to a written results.json."""
    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    results["train"].update(train)
    path.write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def mixed(tmp_path, plain):  # noqa: F811
    """runs/quickstart: the quickstart extended to 600 steps (500 samples) and a 60-step sweep at 100 samples."""
    root = tmp_path / "quickstart"
    with_train(write_run(root / "default", plain("train.max_steps=600"), {600: (54.991, 500)}), wall_time_s=558.0,
               total_wall_time_s=3524.0)
    with_train(write_run(root / "eval.num_samples=100,model.encoder_depth=20",
                         plain("model.encoder_depth=20", "train.max_steps=60", "eval.num_samples=100"),
                         {60: (1710.346, 100)}), wall_time_s=61.0, total_wall_time_s=61.0)
    return root


def report_of(folder, out, monkeypatch, capsys) -> str:
    """`python -m analysis.report FOLDER --out OUT` as a user runs it (in process): what it prints."""
    monkeypatch.setattr(sys, "argv", ["analysis.report", str(folder), "--out", str(out)])
    report_main()
    return capsys.readouterr().out


def sections(out: str) -> dict[str, str]:
    """The printed report as {heading: body}."""
    parts = re.split(r"^== (.*) ==$", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_runs_of_another_step_or_sample_count_are_never_in_one_table(mixed, tmp_path, monkeypatch, capsys):
    printed = sections(report_of(mixed, tmp_path / "out", monkeypatch, capsys))
    short, long = "step 60, 100 samples per FID", "step 600, 500 samples per FID"
    (note,) = [h for h in printed if h.startswith("these runs are at 2 different (step, samples per FID)")]
    assert f"{short}: 1 run(s): eval.num_samples=100,model.encoder_depth=20" in printed[note]
    assert f"{long}: 1 run(s): default" in printed[note] and "--query" in note
    tables = [h for h in printed if h.startswith(("runs at", "paper layout at"))]
    assert sorted(tables) == sorted([f"runs at {short}", f"runs at {long}", *(
        f"paper layout at {at} (ADM evaluator: FID, sFID, IS, precision, recall), published numbers where a paper "
        "row matches" for at in (short, long))])
    for heading in tables:  # each table one (step, samples), both as columns
        body = printed[heading]
        header, row = body.strip().splitlines()[:2]
        assert {"step", "samples"} <= set(header.split()), header
        if short in heading:
            assert re.search(r"\b60\s+100\b", row) and "1710.346" in body and "54.991" not in body, body
        else:
            assert re.search(r"\b600\s+500\b", row) and "54.991" in body and "1710.346" not in body, body
    assert "== runs ==" not in "".join(printed)  # no table mixing the two
    page = (tmp_path / "out" / "report.html").read_text()
    assert "runs at step 60, 100 samples per FID" in page and "<th>samples</th>" in page


def test_every_table_of_the_readme_walkthrough_shows_step_and_samples(walkthrough, tmp_path, monkeypatch, capsys):
    """The tables that compare at one place (ratio, best split, sampling, curve) say it as columns too."""
    printed = sections(report_of(walkthrough, tmp_path / "out", monkeypatch, capsys))
    tables = [h for h in printed if h.startswith(("encoder/decoder ratio", "best split", "sampling", "FID vs",
                                                   "paper layout"))]
    assert len(tables) >= 6, list(printed)
    for heading in tables:
        header = printed[heading].strip().splitlines()[0].split()
        assert "samples" in header and ("step" in header or "step" in heading), (heading, header)


def test_the_report_shows_the_wall_time_of_every_session_and_status_sums_sessions(mixed, tmp_path, monkeypatch,
                                                                                   capsys):
    printed = sections(report_of(mixed, tmp_path / "out", monkeypatch, capsys))
    body = printed["runs at step 600, 500 samples per FID"]
    assert "train.total_wall_time_s" in body and "3524.0" in body and "558.0" not in body  # not the last session's
    # the ledger of the extended run: 500 steps in one session, a day idle, then 100 more in a second one
    ledger = Ledger(mixed / "default")
    for state, when in (("training", 1000.0), ("sampling", 3966.0), ("completed", 4000.0),
                        ("training", 90_000.0), ("sampling", 90_558.0), ("completed", 90_600.0)):
        ledger.enter(state)
        ledger.data["events"][-1]["unix_time"] = when
    ledger._write()
    row = next(r for r in sweep_status(mixed)["points"] if r["run_dir"].endswith("default"))
    assert row["wall_time_s"] == 3000.0 + 600.0  # its two sessions, not the day between them
    text = table(sweep_status(mixed))
    assert re.search(r"^default\s+completed\s+600/600 .* 1h00m\b", text, re.M), text


def test_a_promised_figure_not_drawn_is_named_with_why(mixed, tmp_path, monkeypatch, capsys):
    out = report_of(mixed, tmp_path / "out", monkeypatch, capsys)  # depths 20 and 22 of two recipes
    assert re.search(r"encoder_ratio.png not drawn: the encoder depths in .*quickstart \(20, 22\) belong to "
                     r"different studies", out), out
    assert not (tmp_path / "out" / "encoder_ratio.png").exists()
    alone = tmp_path / "alone"
    (mixed / "default").rename(alone)  # the quickstart alone: one encoder depth
    out = report_of(alone, tmp_path / "out2", monkeypatch, capsys)
    assert f"encoder_ratio.png not drawn: only one encoder_depth (22) in {alone}" in out
    assert f"fid_vs_step.png not drawn: only one encoder_depth (22) in {alone}" in out
    page = (tmp_path / "out2" / "report.html").read_text()
    assert "figures not drawn" in page and f"encoder_ratio.png not drawn: only one encoder_depth (22) in {alone}" in page


def test_an_interrupted_run_shows_the_step_of_its_newest_checkpoint(tmp_path):
    """The issue's case: SIGINT at step 1 (progress last logged at step 0, last.pt at step 1) showed
    `interrupted 0/400`. The run itself is in tests/test_errors.py (a real SIGINT, last.pt loaded)."""
    run = Ledger(tmp_path / "sweep" / "default")
    run.enter("training")
    run.progress(0, 400)
    run.checkpoint(1)  # what Trainer.save reports for last.pt (on_save)
    run.enter("interrupted", reason="SIGINT at step 1")
    status = sweep_status(tmp_path / "sweep")
    assert [(r["state"], r["step"], r["max_steps"]) for r in status["points"]] == [("interrupted", 1, 400)]
    text = table(status)
    assert re.search(r"^default\s+interrupted\s+1/400\b", text, re.M), text
    assert ("interrupted default: SIGINT at step 1; resumes from step 1 (checkpoints/last.pt): run the same "
            "command again") in text


def test_the_report_of_a_missing_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis.report", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"analysis.report: error: {tmp_path / 'nowhere'} does not exist; give a "
                                        "sweep or run folder such as runs/quickstart"]
