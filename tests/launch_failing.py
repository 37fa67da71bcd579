"""`agml` as launched by accelerate, except that one process crashes in the middle of scoring (for test_distributed)."""

import os
import sys

import agml.scoring
from agml.cli import main

FAILING_RANK = os.environ["AGML_TEST_FAILING_RANK"]
real_score_neurons = agml.scoring.score_neurons  # under every scoring entry (answer or entity positions)


def crashing_score_neurons(*args, **kwargs):
    if os.environ["RANK"] == FAILING_RANK:
        raise RuntimeError("simulated crash of one process")
    return real_score_neurons(*args, **kwargs)  # the other processes go on into a collective and wait there


agml.scoring.score_neurons = crashing_score_neurons
raise SystemExit(main(sys.argv[1:]))
