"""Progress output: a tqdm bar on a terminal, plain lines elsewhere (mpirun's
pseudo-terminals included), silence off rank 0, MEGABATCH_PLAIN_PROGRESS."""

import io

import pytest

from megabatch.errors import UserError
from megabatch.progress import PLAIN_VARIABLE, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_shows_epoch_step_loss_rate_and_eta():
    out = io.StringIO()
    progress = Progress(epochs=3, steps_per_epoch=10, stream=out, interactive=True)
    progress.step(0, 1, 2.5, 1000.0)
    progress.step(0, 10, 1.25, 1234.0)  # the last step of an epoch is always drawn
    progress.info("epoch 1/3 done")
    text = out.getvalue()
    assert text.count("\r") >= 2
    assert "epoch 1/3 step 1/10 |" in text and "|   3%, loss 2.5000, 1,000 img/s, ETA " in text
    assert "epoch 1/3 step 10/10 |" in text and "|  33%, loss 1.2500, 1,234 img/s, ETA " in text
    assert text.endswith("\repoch 1/3 done\n")  # the bar is cleared before a plain line


def test_a_resumed_run_starts_its_bar_where_it_left_off():
    out = io.StringIO()
    Progress(epochs=2, steps_per_epoch=10, stream=out, interactive=True).step(1, 5, 0.5, 10.0)
    assert "epoch 2/2 step 5/10 |" in out.getvalue() and "|  75%, loss 0.5000" in out.getvalue()


def test_the_bar_is_gone_when_the_run_ends():
    out = io.StringIO()
    progress = Progress(epochs=1, steps_per_epoch=3, stream=out, interactive=True)
    for step in (1, 2, 3):
        progress.step(0, step, 1.0, 1.0)
    progress.info("final: done")
    text = out.getvalue()
    assert "| 100%" in text and text.endswith("final: done\n")
    *_, last_bar, erased, _ = text.split("\r")  # the last bar, then blanks over it, then the line
    assert "| 100%" in last_bar and erased.strip() == ""


def test_off_a_terminal_only_plain_lines():
    out = io.StringIO()
    progress = Progress(epochs=3, steps_per_epoch=10, stream=out, interactive=False)
    progress.step(0, 5, 2.5, 1000.0)
    progress.info("epoch 1/3 ...")
    assert out.getvalue() == "epoch 1/3 ...\n"


def test_other_ranks_stay_quiet():
    out = io.StringIO()
    progress = Progress(epochs=1, steps_per_epoch=1, stream=out, enabled=False, interactive=True)
    progress.step(0, 1, 1.0, 1.0)
    progress.info("x")
    assert out.getvalue() == ""


@pytest.mark.parametrize("env, stream, bar", [
    ({}, Terminal, True),
    ({}, io.StringIO, False),
    # mpirun hands every rank a pseudo-terminal, even when its output goes to a file
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, Terminal, False),
    ({PLAIN_VARIABLE: "1"}, Terminal, False),
    ({PLAIN_VARIABLE: "0", "OMPI_COMM_WORLD_SIZE": "2"}, Terminal, True),
    ({PLAIN_VARIABLE: "0"}, io.StringIO, False),
], ids=["terminal", "file", "mpirun", "forced-plain", "forced-bar-under-mpirun", "forced-bar-into-a-file"])
def test_when_the_bar_is_drawn(env, stream, bar):
    out = stream()
    progress = Progress(epochs=1, steps_per_epoch=4, stream=out, env=env)
    progress.step(0, 1, 1.0, 1.0)
    progress.info("epoch 1/1 done")
    assert progress.interactive is bar
    assert ("\r" in out.getvalue()) is bar
    assert out.getvalue().endswith("epoch 1/1 done\n")


def test_a_bad_value_of_the_variable_is_a_user_error():
    with pytest.raises(UserError, match=f"{PLAIN_VARIABLE}='yes' must be 1"):
        Progress(epochs=1, steps_per_epoch=1, stream=Terminal(), env={PLAIN_VARIABLE: "yes"})


class GoneReader(Terminal):
    """A stream whose reader left: every write fails, as on a closed pipe."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("interactive", [False, True])
def test_a_run_outlives_its_output(capsys, interactive):
    progress = Progress(epochs=2, steps_per_epoch=4, stream=GoneReader(), interactive=interactive)
    progress.step(0, 1, 2.5, 1000.0)
    progress.info("epoch 1/2 ...")  # the run goes on: no error
    progress.info("epoch 2/2 ...")
    assert not progress.enabled
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("megabatch: warning: the output is gone (Broken pipe)")
