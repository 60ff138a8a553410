"""Predict the time, throughput and scaling efficiency of a recipe on a cluster.

:mod:`~megabatch.simulate.perfmodel` holds the equations (pure functions),
:mod:`~megabatch.simulate.hardware` the presets with a source for every figure,
:mod:`~megabatch.simulate.command` the ``megabatch simulate`` command. Nothing
here imports torch; matplotlib is imported only to draw ``--plot``.
"""
