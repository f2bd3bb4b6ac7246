"""The ``threads`` knob: parsed strictly, applied once per process, and chosen per backbone by default."""

from __future__ import annotations

import pytest
import torch

from r2m_lab.threads import apply_threads, parse_threads
from tests.conftest import compose_config


@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("AUTO", None), (None, None), (1, 1), ("3", 3)])
def test_parse_threads(value, expected):
    assert parse_threads(value) == expected


@pytest.mark.parametrize("value", [0, -2, "two", 1.5, True, [1]])
def test_parse_threads_refuses_what_is_not_auto_or_a_count(value):
    with pytest.raises(ValueError, match="threads must be `auto` or a positive integer"):
        parse_threads(value)


def test_apply_threads_sets_a_count_and_auto_leaves_it():
    before = torch.get_num_threads()
    try:
        assert apply_threads(2) == torch.get_num_threads() == 2
        assert apply_threads("auto") == 2, "auto keeps what the process has (torch's default in a fresh one)"
        assert apply_threads(1) == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_default_is_auto_and_takes_a_count(tmp_path):
    assert compose_config(tmp_path, smoke=False).threads == "auto"
    assert compose_config(tmp_path, ["threads=4"], smoke=False).threads == 4


def test_cli_sleeps_waiting_openmp_threads_unless_told_otherwise(tmp_path):
    """`python -m r2m_lab` sets OMP_WAIT_POLICY=PASSIVE before torch loads; a policy in the environment wins."""
    import os
    import subprocess
    import sys

    probe = (
        "import os, sys; from r2m_lab.threads import passive_openmp_wait; "
        "print(passive_openmp_wait(), os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["True", "PASSIVE", "False"]
    run = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "active"}, capture_output=True, text=True
    )
    assert run.stdout.split() == ["False", "active", "False"]
    # the entry point's module (Hydra included) loads no torch before main() sets the policy
    loaded = "import sys, r2m_lab.__main__; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True).stdout.strip() == "False"
