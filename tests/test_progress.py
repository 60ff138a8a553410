"""Progress output: a redrawn bar on a terminal, plain lines elsewhere, silence off rank 0."""

import io

from megabatch.progress import Progress, format_duration


def test_bar_on_a_terminal_shows_epoch_step_loss_rate_and_eta():
    out = io.StringIO()
    progress = Progress(epochs=3, steps_per_epoch=10, stream=out, interactive=True)
    progress.step(0, 1, 2.5, 1000.0)
    progress.step(0, 10, 1.25, 1234.0)  # the last step of an epoch is always drawn
    progress.info("epoch 1/3 done")
    text = out.getvalue()
    assert text.count("\r") >= 2 and "\033[K" in text
    assert "epoch 1/3 [####################] step 10/10 loss 1.2500 1,234 img/s ETA " in text
    assert text.endswith("epoch 1/3 done\n")


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


def test_format_duration():
    assert [format_duration(s) for s in (0, 59, 61, 3600 + 62)] == ["0:00", "0:59", "1:01", "1:01:02"]
