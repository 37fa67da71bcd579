"""`agml` as launched by accelerate, except that one process crashes in the middle of scoring (for test_distributed)."""

import os
import sys

import agml.scoring
from agml.cli import main

FAILING_RANK = os.environ["AGML_TEST_FAILING_RANK"]
real_score_records = agml.scoring.score_records


def crashing_score_records(*args, **kwargs):
    if os.environ["RANK"] == FAILING_RANK:
        raise RuntimeError("simulated crash of one process")
    return real_score_records(*args, **kwargs)  # the other processes go on into a collective and wait there


agml.scoring.score_records = crashing_score_records
raise SystemExit(main(sys.argv[1:]))
