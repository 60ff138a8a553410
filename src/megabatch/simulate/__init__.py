"""Predict the time, throughput and scaling efficiency of a recipe on a cluster.

:mod:`~megabatch.simulate.perfmodel` holds the equations (pure functions),
:mod:`~megabatch.simulate.hardware` the presets with a source for every figure,
:mod:`~megabatch.simulate.inputs` the units people quote figures in,
:mod:`~megabatch.simulate.records` the published runs the model is checked against,
:mod:`~megabatch.simulate.fit` the least-squares fit of its two empirical parameters
and the leave-one-out check, :mod:`~megabatch.simulate.bench_file` the reading of a
``megabatch bench`` result, :mod:`~megabatch.simulate.report` the tables and the plot,
and :mod:`~megabatch.simulate.command` the ``megabatch simulate`` command. Nothing here
imports torch; matplotlib is imported only to draw ``--plot``.
"""
