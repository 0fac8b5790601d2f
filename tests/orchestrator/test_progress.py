"""The live view: one table redrawn in place on a terminal (a real pseudo-terminal here), one plain
line per change elsewhere. Tune calls the callback with its own Trial objects; these stand-ins
carry the attributes the callback reads."""

from __future__ import annotations

import io
import os
import select
import sys

from orchestrator.config import Target
from orchestrator.progress import LiveTable


class Trial:
    def __init__(self, trial_id: str, method: str):
        self.trial_id, self.status = trial_id, "PENDING"
        self.config = {"run": {"trial": {"method": {"name": method}}}}

    def __str__(self) -> str:
        return f"{self.config['run']['trial']['method']['name']}-{self.trial_id}"


def drive(live: LiveTable) -> list[Trial]:
    trials = [Trial("a", "lora"), Trial("b", "boft")]
    trials[0].status = "RUNNING"
    live.on_trial_start(0, trials, trials[0])
    for step in (10, 20):
        live.on_trial_result(0, trials, trials[0], {"step": step, "accuracy": step / 25})
    live.on_trial_result(0, trials, trials[0], {"step": 20, "accuracy": 0.8})  # no change: no new line
    trials[0].status = "TERMINATED"
    live.on_trial_complete(0, trials, trials[0])
    return trials


def test_plain_lines_when_not_a_terminal(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    drive(LiveTable(Target("accuracy", 0.75, "max"), every_s=0))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("trial=lora-a  status=RUNNING  method=lora")
    assert [ln.split("  ")[1] for ln in lines if ln.startswith("trial=lora-a")] == ["status=RUNNING"] * 3 + ["status=TERMINATED"]
    assert sum("step=20" in ln for ln in lines) == 2  # RUNNING at 20 once, then TERMINATED at 20
    assert "\x1b[" not in out.getvalue()  # no terminal control in a log


def test_one_table_redrawn_in_place_on_a_terminal(monkeypatch):
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stdout", tty)
    drive(LiveTable(Target("accuracy", 0.75, "max"), every_s=0))
    tty.flush()
    chunks = []
    while select.select([master], [], [], 0.2)[0]:  # a pty hands its buffer out in pieces
        chunks.append(os.read(master, 1 << 16))
    written = b"".join(chunks).decode()
    tty.close()
    os.close(master)
    tables = written.count("trials done")
    assert tables == 5  # start, 3 results, completion: every one drawn over the previous
    assert written.count("\x1b[J") == tables - 1  # cursor up + clear before every redraw
    last = written.rsplit("\x1b[J", 1)[1]  # what the screen shows at the end: one table
    assert last.count("trials done") == 1 and "1/2 trials done" in last
    assert "TERMINATED" in last and "PENDING" in last and "RUNNING" not in last


def test_a_trial_stopped_by_the_time_budget_gets_its_last_line_at_the_end(monkeypatch):
    """The budget stops running trials without a hook per trial: the experiment's end shows them."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    live = LiveTable(Target("accuracy", 0.75, "max"), every_s=0)
    trials = drive(live)
    trials[1].status = "RUNNING"
    live.on_trial_start(0, trials, trials[1])
    live.on_trial_result(0, trials, trials[1], {"step": 5, "accuracy": 0.2})
    trials[1].status = "TERMINATED"  # what Tune does when the budget runs out; no on_trial_complete
    before = out.getvalue().count("\n")
    live.on_experiment_end(trials)
    new = out.getvalue().splitlines()[before:]
    assert new == [ln for ln in new if ln.startswith("trial=boft-b  status=TERMINATED")] and len(new) == 1
