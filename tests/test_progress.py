"""Long work (the export's held-out scoring and decoding, compare's retraining, plan's probe) shows a line at least
every 30 seconds: done / total, elapsed, an estimate; and one line at its end."""

from __future__ import annotations

import re
import time

import pytest

from llmm_tune.train.lm_scoring import greedy_generate
from llmm_tune.train.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_says_done_of_total_elapsed_and_what_is_left_at_the_pace_so_far():
    clock, said = Clock(), []
    progress = Progress("decoding", 200, say=said.append, clock=clock)
    assert progress.line() == "decoding: 0/200, 0m00s elapsed, no estimate yet"
    clock.now += 90
    progress.advance(50)
    assert progress.line() == "decoding: 50/200, 1m30s elapsed, about 4m30s left"
    assert progress.line(final=True) == "decoding: 50/200 in 1m30s"


def test_a_line_comes_every_period_while_the_work_runs_even_within_one_long_step_and_once_at_its_end():
    said = []
    with Progress("retraining", 3, every=0.05, say=said.append) as progress:
        time.sleep(0.28)  # one step longer than five periods
        progress.advance()
    assert len(said) >= 4 and all(line.startswith("retraining: 0/3, ") for line in said[:-1])
    assert said[-1].startswith("retraining: 1/3 in ")


def test_failed_work_ends_its_lines_without_a_final_one():
    said = []
    with pytest.raises(RuntimeError), Progress("probing", 2, every=60, say=said.append):
        raise RuntimeError("the probe failed")
    assert said == []


def test_decoding_advances_the_progress_by_every_prompt(tiny_llama):
    from llmm_tune.train.pretrained import tokenizer_for

    tokenizer = tokenizer_for("smollm2", False)
    tiny_llama.resize_token_embeddings(len(tokenizer))
    said = []
    prompts = ["1 + 1 =", "The capital of France is", "Hello", "a b c d e f g"]
    with Progress("decoding", len(prompts), every=60, say=said.append) as progress:
        greedy_generate(tiny_llama, tokenizer, prompts, 3, 2, "cpu", progress=progress)
    assert progress.done == len(prompts) and said == [f"decoding: 4/4 in {said[0].split(' in ')[1]}"]


def test_by_default_each_line_goes_to_the_console_and_to_the_log(capsys, caplog):
    caplog.set_level("INFO", logger="llmm_tune.progress")
    with Progress("scoring", 1, every=60) as progress:
        progress.advance()
    assert capsys.readouterr().out.startswith("scoring: 1/1 in ")
    assert [r.getMessage() for r in caplog.records if r.name == "llmm_tune.progress"][0].startswith("scoring: 1/1")


def test_a_searchs_status_line_counts_each_trial_once_by_how_it_ended():
    """The search console's line (llmm_tune.tune.console), one pass over the trials: an ended trial is done or failed
    (an error, or a reported failure), one Tune has not yet marked ended counts as ended once announced, and the
    estimate counts a running trial by the share of its budget done."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from llmm_tune.errors import FAILURE_KEY
    from llmm_tune.tune.console import Progress as SearchProgress

    def trial(name: str, status: str, epoch: float, value: float | None = None, **result):
        return SimpleNamespace(trial_id=name, status=status,
                               last_result={"epoch": epoch, "best_val_mcc": value, **result})

    console = SearchProgress("mcc", "max", 10, ("epoch", 4.0))
    console.ended.add("announced")
    trials = [trial("done", Trial.TERMINATED, 4, 0.3), trial("crashed", Trial.ERROR, 2, 0.1),
              trial("diverged", Trial.TERMINATED, 1, None, **{FAILURE_KEY: "nan"}),
              trial("announced", Trial.RUNNING, 2, 0.5), trial("half", Trial.RUNNING, 2, 0.4),
              trial("waiting", Trial.PENDING, 0)]
    # 70 s for 2.75 trials' work (ended: 1 + 0.5 + 0.25 + 0.5, running 0.5); left: 5 waiting x 0.5625 (the ended
    # trials' mean share) + 0.5 for the half-done one (the one ended trial past half ran to its end): 84.3 s
    console.started = time.time() - 70
    line = console.status(trials)
    assert "trials: 1 running, 2 done, 2 failed of 10 | best val mcc 0.5000 (trial announced) | ETA 1m24s" in line


def test_a_budgeted_search_s_eta_ends_at_its_deadline_at_the_latest_and_names_the_clock_time():
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from llmm_tune.tune.console import Progress as SearchProgress

    def eta(console: SearchProgress, trials: list) -> tuple[float, str, set[str]]:
        """The line's ETA in seconds, its clock time, and the clock times it may name (a minute may turn)."""
        before = time.time()
        minutes, seconds, end = re.search(r"ETA (\d+)m(\d+)s \(ends (\d\d:\d\d)\)$", console.status(trials)).groups()
        left = int(minutes) * 60 + int(seconds)
        return left, end, {time.strftime("%H:%M", time.localtime(t + left)) for t in (before, time.time())}

    console = SearchProgress("mcc", "max", 10, ("epoch", 4.0), deadline=300.0)
    running = SimpleNamespace(trial_id="a", status=Trial.RUNNING, last_result={"epoch": 1.0, "best_val_mcc": 0.1})
    console.started = time.time() - 60  # a quarter of a trial in a minute: 9.75 trials' work left, 39 min by rate
    left, end, ends = eta(console, [running])
    assert 235 <= left <= 240 and end in ends  # the deadline's 4 minutes, not the rate's 39
    left, end, ends = eta(SearchProgress("mcc", "max", 10, ("epoch", 4.0), deadline=300.0), [])
    assert 295 <= left <= 300 and end in ends  # before any work: the deadline
    left, end, ends = eta(SearchProgress("mcc", "max", 10, ("epoch", 4.0), deadline=300.0, planned=200.0), [])
    assert 195 <= left <= 200 and end in ends  # before any work, with the budget's plan of the trials: the plan


def test_the_eta_counts_the_work_left_at_the_rate_done_so_far_with_ashas_stops_from_the_ended_trials():
    from llmm_tune.tune.console import eta_seconds

    assert eta_seconds(10.0, 4, [], []) is None  # no work done yet: no rate
    assert eta_seconds(60.0, 2, [], [0.5, 0.5]) == pytest.approx(3 * 60)  # none ended: whole budgets; 1 trial a minute
    # two ended, at a quarter and at the end: a waiting trial is expected to run 0.625; the one at 0.5 to the end
    assert eta_seconds(100.0, 3, [0.25, 1.0], [0.5]) == pytest.approx((3 * 0.625 + 0.5) * 100 / 1.75)
    assert eta_seconds(100.0, 0, [1.0], [0.25]) == pytest.approx(0.75 * 100 / 1.25)  # only the running one is left


def test_a_budgeted_search_s_eta_starts_from_its_plan_and_moves_to_the_measured_rate_as_the_work_is_done():
    from llmm_tune.tune.console import eta_seconds

    assert eta_seconds(60.0, 2, [], [], planned=300.0) == pytest.approx(240.0)  # before any report: the plan's rest
    assert eta_seconds(400.0, 2, [], [], planned=300.0) is None  # past its plan with nothing reported: unknown
    # a quarter of the work done (0.5 of 2 trials): the rate says 180 s left, the plan 3/4 of its 300 s; weighted by
    # the work done and left
    assert eta_seconds(60.0, 0, [], [0.25, 0.25], planned=300.0) == pytest.approx(0.25 * 180 + 0.75 * 225)
    # near the end the rate decides: 0.1 of 2 trials left at 10 s by the rate, 15 s by the plan
    assert eta_seconds(190.0, 0, [1.0], [0.9], planned=300.0) == pytest.approx(0.95 * 10 + 0.05 * 15)


def test_the_eta_s_rate_and_plan_count_from_the_first_report_leaving_out_the_start():
    from llmm_tune.tune.console import eta_seconds

    # the main job's shape: 2 trials, planned to end at 402 s, the first report (0.125 of a trial) at 55 s; at 120 s
    # half a trial each: the rate since (0.375 in 65 s) and the plan's 347 s after the first report, in proportion to
    # the work left (1.5 of the 1.875 after it), weighted by the work done and left
    first = (55.0, 0.125)
    at_120 = eta_seconds(120.0, 0, [], [0.25, 0.25], planned=402.0, first=first)
    assert at_120 == pytest.approx(0.25 * 1.5 * 65 / 0.375 + 0.75 * 347 * 1.5 / 1.875)
    # no work since the first report (Tally.since_first gives the work now until the rate is ready): the plan's end
    # stands; without a plan, or with one already past, the rate from the start
    no_rate = (55.0, 0.25)
    assert eta_seconds(64.0, 0, [], [0.125, 0.125], planned=402.0, first=no_rate) == pytest.approx(402 - 64)
    assert eta_seconds(64.0, 0, [], [0.125, 0.125], first=no_rate) == pytest.approx(1.75 * 64 / 0.25)
    assert eta_seconds(64.0, 0, [], [0.125, 0.125], planned=50.0, first=no_rate) == pytest.approx(1.75 * 64 / 0.25)


def test_the_rate_counts_from_the_first_report_once_as_many_reports_followed_as_trials_run():
    from llmm_tune.tune.console import Tally

    tally = Tally("max", "best_val_mcc", "epoch", 4.0)
    tally.reported("a", {})  # started, nothing done: no report of work yet
    assert tally.since_first(0.0) is None
    tally.reported("a", {"epoch": 1.0})
    tally.reported("b", {"epoch": 1.0})  # the other trial's first report: its start-up in it, no rate yet
    assert tally.since_first(0.0)[1] == tally.work() == 0.5
    tally.reported("a", {"epoch": 2.0})
    seconds, first_work = tally.since_first(0.0)
    assert first_work == 0.25 and tally.work() == 0.75 and seconds > 0  # the rate: 0.5 of work since the first
    tally.restart_rate()  # a resumed search's rebuilt counts: their work took no time here
    assert tally.since_first(0.0)[1] == tally.work() == 0.75


def test_a_searchs_status_line_is_kept_by_tunes_callbacks_after_its_first_pass_over_the_trials():
    """After the first line, the counts follow Tune's callbacks: the line no longer passes over every trial (here
    given none), which in a search of 10,000 trials took a quarter of the driver's time."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from llmm_tune.errors import FAILURE_KEY
    from llmm_tune.tune.console import Progress as SearchProgress

    console = SearchProgress("mcc", "max", 4, ("epoch", 4.0))
    assert "trials: 0 running, 0 done, 0 failed of 4 | no result yet" in console.status([])
    first, second = (SimpleNamespace(trial_id=name, status=Trial.RUNNING, last_result={}, error_file=None,
                                     num_failures=0, path=name) for name in ("first", "second"))
    for trial in (first, second):
        console.on_trial_start(iteration=1, trials=[], trial=trial)
    first.last_result = {"epoch": 2, "best_val_mcc": 0.4, "training_iteration": 2}
    console.on_trial_result(iteration=2, trials=[], trial=first, result=first.last_result)
    assert "trials: 2 running, 0 done, 0 failed of 4 | best val mcc 0.4000 (trial first)" in console.status([])
    first.status = Trial.TERMINATED
    console.on_trial_complete(iteration=3, trials=[], trial=first)
    second.last_result = {"epoch": 1, "best_val_mcc": 0.6, FAILURE_KEY: "nan", "training_iteration": 1}
    console.on_trial_result(iteration=4, trials=[], trial=second, result=second.last_result)
    console.on_trial_complete(iteration=5, trials=[], trial=second)
    assert "trials: 0 running, 1 done, 1 failed of 4 | best val mcc 0.6000 (trial second)" in console.status([])
