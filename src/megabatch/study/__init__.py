"""``megabatch study``: accuracy against batch size over a grid of methods, batches and seeds.

:mod:`~megabatch.study.spec` reads a spec (the grid, its seeds and learning-rate factors),
:mod:`~megabatch.study.runner` runs it (several runs at once, resumable, stopping cleanly on
SIGTERM), :mod:`~megabatch.study.report` writes the table, the report and the plots, and
:mod:`~megabatch.study.command` is the command.
"""
