"""Test driver: ``megabatch`` in float64 (for tight comparisons between runs), optionally
slowed down after some step so that a test can kill it mid-run. Used by
test_distributed.py, alone and under torchrun."""

import os
import sys
import time

import torch

import megabatch.train
from megabatch.cli import main

torch.set_default_dtype(torch.float64)
delay_after = int(os.environ.get("MEGABATCH_TEST_SLOW_AFTER", "-1"))
if delay_after >= 0:
    original = megabatch.train.train_step

    def slow_step(run, micro_batches):
        if run.iteration >= delay_after:
            time.sleep(0.5)
        return original(run, micro_batches)

    megabatch.train.train_step = slow_step

sys.exit(main())
