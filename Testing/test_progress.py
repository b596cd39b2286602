"""The one progress shape: its text, its timing clock, the CLI's bar, and a worker job's status round trip."""

from __future__ import annotations

import io
import time

import pytest
from tqdm import tqdm

from FMSegCore.progress import Progress, ProgressClock, bar_callback, format_seconds
from FMSegCore.server.jobs import Job, JobCancelled, JobRunner


def test_progress_describes_itself_in_one_line():
    update = Progress(3, 150, "training (lora)", loss=0.51234, elapsed=2.0, remaining=98.0)
    assert update.fraction == pytest.approx(0.02)
    assert update.describe() == "3/150, loss 0.5123: training (lora), 2 min left"
    assert update.describe(count=False) == "loss 0.5123: training (lora), 2 min left"
    assert Progress(0, 0, "loading").describe() == "loading" and Progress(0, 0).fraction is None
    # nothing left to estimate before the first unit or once done
    assert Progress(0, 4, remaining=10.0).left() == "" and Progress(4, 4, remaining=0.0).left() == ""
    assert Progress(5, 4).fraction == 1.0
    assert [format_seconds(s) for s in (4.4, 600, 9000)] == ["4 s", "10 min", "2.5 h"]


def test_the_clock_estimates_the_time_left_from_the_pace_so_far():
    seen: list[Progress] = []
    clock = ProgressClock(seen.append, 4, "segmenting")
    time.sleep(0.05)
    clock(1)
    time.sleep(0.05)
    clock(2, message="spleen", loss=0.25)
    first, second = seen
    assert (first.step, first.total, first.message, first.loss) == (1, 4, "segmenting", None)
    assert second.message == "spleen" and second.loss == 0.25 and second.elapsed > first.elapsed >= 0.05
    # two units in ``elapsed`` seconds, two to go: as long again
    assert second.remaining == pytest.approx(second.elapsed, rel=1e-6)
    assert first.remaining == pytest.approx(3 * first.elapsed, rel=1e-6)
    assert ProgressClock(None, 4)(1) is None  # no callback: nothing reported


def test_a_resumed_count_only_paces_what_this_run_did():
    seen: list[Progress] = []
    clock = ProgressClock(seen.append, 100, "downloading", start=50)
    assert clock(50).remaining is None  # nothing done yet by this run
    time.sleep(0.05)
    update = clock(75)
    assert update.remaining == pytest.approx(update.elapsed, rel=1e-6)  # 25 units done, 25 to go


def test_the_cli_bar_shows_count_message_and_loss():
    stream = io.StringIO()
    bar = tqdm(total=None, desc="Segmenting", file=stream, mininterval=0)
    show = bar_callback(bar)
    show(Progress(2, 8, "liver"))
    assert (bar.n, bar.total) == (2, 8) and bar.desc.startswith("liver")
    show(Progress(3, 8, "", loss=0.5))
    assert bar.n == 3 and bar.desc.startswith("liver") and "loss=0.500" in stream.getvalue()
    kept = tqdm(total=4, desc="Adapting (lora)", file=io.StringIO())
    bar_callback(kept, describe=False)(Progress(1, 4, "training (lora)"))
    assert kept.desc.startswith("Adapting (lora)") and kept.n == 1
    bar.close()
    kept.close()


def test_a_jobs_status_carries_the_progress_and_cancels_on_report():
    job = Job("adapt")
    job.state, job.started = "running", time.time() - 2.0
    job.progress(Progress(3, 10, "training (lora)", loss=0.4, elapsed=1.0, remaining=7.0))
    job.progress(Progress(4, 10, "", loss=0.3, elapsed=1.5, remaining=6.0))  # an empty message keeps the last
    status = job.status()
    assert (status["done"], status["total"], status["message"], status["loss"]) == (4, 10, "training (lora)", 0.3)
    assert status["elapsed"] >= 2.0 and 5.0 < status["remaining"] <= 6.0
    again = Progress.from_json(status)
    assert (again.step, again.total, again.message, again.loss) == (4, 10, "training (lora)", 0.3)
    assert again.remaining == status["remaining"]
    job.state = "done"
    assert job.status()["remaining"] is None  # a finished job has nothing left
    assert Progress.from_json({"done": 1, "total": 2, "message": "x"}).remaining is None  # an older worker
    job.cancel()
    with pytest.raises(JobCancelled):
        job.progress(Progress(5, 10))


def test_the_runner_times_a_job_from_its_start():
    runner = JobRunner()
    try:
        def work(job: Job) -> dict:
            clock = ProgressClock(job.progress, 3, "counting")
            for step in range(1, 4):
                time.sleep(0.02)
                clock(step)
            return {"ok": True}

        job = runner.submit("test", work)
        deadline = time.monotonic() + 30
        while job.state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.01)
        status = job.status()
        assert status["state"] == "done" and (status["done"], status["total"], status["message"]) == (3, 3, "counting")
        assert status["elapsed"] >= 0.06 and status["remaining"] is None
    finally:
        runner.shutdown()


def test_off_a_terminal_progress_is_a_line_every_few_seconds_and_one_at_the_end():
    import io

    from FMSegCore.progress import LineProgress, progress_bar, show_progress

    assert show_progress(None) and show_progress(True) and not show_progress(False)
    log = io.StringIO()
    bar = progress_bar(True, total=4, unit="slice", desc="Segmenting", interval=3600, stream=log)
    assert isinstance(bar, LineProgress)
    for _ in range(3):
        bar.update(1)
    assert log.getvalue() == ""  # within the interval: quiet
    bar.interval = 0
    bar.update(1)
    bar.total = 5  # a bar whose total grows, as propagation finds more slices
    bar.set_description("kidney_left")
    bar.close()
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("Segmenting: 4/4 slices, ") and "elapsed" in lines[0]
    assert lines[-1].startswith("kidney_left: 4/5 slices") and "left" in lines[-1] and len(lines) == 3
    quiet = io.StringIO()
    silent = progress_bar(False, total=3, stream=quiet)
    silent.update(3)
    silent.close()
    assert quiet.getvalue() == ""
