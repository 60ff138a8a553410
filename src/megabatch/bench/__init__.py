"""``megabatch bench``: what training does on this machine, in images/s.

:mod:`~megabatch.bench.command` is the command and its ResNet-50 measurements,
:mod:`~megabatch.bench.small_cnn` the small-CNN bench (``--model small-cnn``),
:mod:`~megabatch.bench.settings` and :mod:`~megabatch.bench.flags` its settings per
device, :mod:`~megabatch.bench.steps` the train steps timed (megabatch's and a plain
PyTorch loop's), :mod:`~megabatch.bench.inputs` the input pipelines on a folder of
JPEGs, :mod:`~megabatch.bench.timing` how anything is timed (warm-up, repeats,
interleaving), :mod:`~megabatch.bench.profiling` the ``torch.profiler`` summary of a
step, and :mod:`~megabatch.bench.report` the printed rows, ratios and the result file.
"""
