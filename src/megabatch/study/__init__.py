"""`megabatch study`: accuracy against batch size over a grid of methods, batches and seeds."""

from megabatch.study.runner import run_study
from megabatch.study.spec import Method, StudySpec, load_spec

__all__ = ["Method", "StudySpec", "load_spec", "run_study"]
