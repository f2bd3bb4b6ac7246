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


def test_threads_default_is_the_backbones_choice(tmp_path):
    assert compose_config(tmp_path, smoke=False).threads == 1  # backbone=tiny: one thread per process
    assert compose_config(tmp_path, ["backbone=clip_vit_b16"], smoke=False).threads == "auto"
    assert compose_config(tmp_path, ["threads=4"], smoke=False).threads == 4
