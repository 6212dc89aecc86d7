"""What a reader of the charts and the progress lines gets: labelled axes with units, accuracy
in percent, log scales where terms differ by orders of magnitude, readable lines in logs."""

import io

import pytest

from fadrm.errors import ConfigError
from fadrm.progress import LogLines, bar
from fadrm.visualize import Axis, bar_plot, line_figure

ROWS = [{"epoch": 1, "top1": 0.25, "top5": 0.6}, {"epoch": 2, "top1": 0.5, "top5": 0.9}]


def test_accuracy_is_drawn_in_percent_with_labelled_axes():
    fig = line_figure(ROWS, "epoch", Axis(("top1", "top5"), "test accuracy (%)", percent=True), "t", xlabel="epoch")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "test accuracy (%)" and ax.get_xlabel() == "epoch"
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines == {"top-1": [25.0, 50.0], "top-5": [60.0, 90.0]}
    assert ax.yaxis.get_major_formatter()(50.0, 0) == "50%"


def test_terms_of_different_magnitude_get_a_log_axis_and_a_second_unit_its_own_axis():
    rows = [{"step": 0, "loss": 30.0, "ce": 2.0, "bn": 28.0, "acc": 0.1}, {"step": 10, "loss": 3.0, "ce": 0.1, "bn": 2.9}]
    fig = line_figure(
        rows,
        "step",
        Axis(("loss", "ce", "bn"), "loss (log scale)", log=True),
        "t",
        xlabel="iteration",
        right=Axis(("acc",), "accuracy (%)", percent=True),
    )
    left, right = fig.axes
    assert left.get_yscale() == "log" and left.get_ylabel() == "loss (log scale)"
    assert right.get_ylabel() == "accuracy (%)" and list(right.get_lines()[0].get_ydata()) == [10.0]


def test_bar_chart_of_seconds_has_a_labelled_log_axis(tmp_path):
    rows = [{"stage": "prepare", "seconds": 0.5}, {"stage": "squeeze", "seconds": 300.0}]
    path = bar_plot(rows, "stage", "seconds", tmp_path / "bars.png", "time per stage", xlabel="seconds (log scale)", log=True)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_log_lines_end_with_the_final_state(interval):
    out = io.StringIO()
    progress = LogLines(4, "recover", unit="step", interval=interval, stream=out)
    for _ in range(4):
        progress.update()
    progress.set_postfix(loss="0.5")
    progress.close()
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("recover: 4/4 step (100%)") and lines[-1].endswith("loss=0.5")
    assert len(lines) == (5 if interval == 0 else 1)  # a line per interval, one at the end, none twice
    assert "\r" not in out.getvalue()


@pytest.mark.parametrize("seconds, shown", [(71, "01:11"), (3611, "1:00:11"), (90061, "25:01:01")])
def test_log_lines_count_hours_past_the_first(monkeypatch, seconds, shown):
    """A recovery of 1 h 0 min 11 s once read "00:11 elapsed": minutes wrapped at 60."""
    clock = iter([1000.0, 1000.0 + seconds])
    monkeypatch.setattr("fadrm.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    progress = LogLines(2, "recover", unit="step", stream=out)
    progress.close()
    assert out.getvalue() == f"recover: 0/2 step (0%), {shown} elapsed\n"


def test_jobs_sharing_a_log_name_their_lines_at_their_own_interval(monkeypatch, capsys):
    """What a benchmark's worker processes set: a label per job, fewer lines (here: only the last)."""
    monkeypatch.setenv("FADRM_PROGRESS", "1")
    monkeypatch.setenv("FADRM_PROGRESS_LABEL", "fadrm ipc10 s0 convnet soft")
    monkeypatch.setenv("FADRM_PROGRESS_INTERVAL", "3600")
    progress = bar(3, "evaluate (convnet)", unit="epoch")
    for _ in range(3):
        progress.update()
    progress.close()
    assert capsys.readouterr().err.splitlines() == [
        "[fadrm ipc10 s0 convnet soft] evaluate (convnet): 3/3 epoch (100%), 00:00 elapsed"
    ]
    monkeypatch.setenv("FADRM_PROGRESS_INTERVAL", "often")
    with pytest.raises(ConfigError, match="FADRM_PROGRESS_INTERVAL must be a number of seconds"):
        bar(3, "evaluate (convnet)")
