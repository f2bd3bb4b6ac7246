"""Specialist screening: fine-tuned toy specialists, one with flipped labels and one scaled 10×, are flagged by name."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import Tensor, nn

from r2m_lab.screening import ScreeningReport, screen_specialists
from tests.test_mergers import LazyStateDict

torch.set_num_threads(1)

DIM = 8


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.mlp = nn.LayerNorm(DIM), Mlp()


class TinyBackbone(nn.Module):
    """A one-block residual MLP whose keys look like a timm ViT's (blocks.0.mlp.fc1.weight, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block()])

    def forward(self, x: Tensor) -> Tensor:
        block = self.blocks[0]
        return x + block.mlp.fc2(torch.relu(block.mlp.fc1(block.norm1(x))))


def pretrained() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """θ₀ and the head every specialist starts from (the same seed, as make_head does)."""
    torch.manual_seed(0)
    backbone, head = TinyBackbone(), nn.Linear(DIM, 2)
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}, {
        k: v.detach().clone() for k, v in head.state_dict().items()
    }


def finetune(theta0, head0, family: int, flip: bool = False, steps: int = 40) -> tuple[dict, dict]:
    """Fine-tune backbone + head on "fake = real + a shift along this family's direction" (labels flipped if asked)."""
    g = torch.Generator().manual_seed(100 + family)
    common = torch.ones(DIM) / DIM**0.5
    own = torch.randn(DIM, generator=torch.Generator().manual_seed(family))
    direction = common + 0.6 * own / own.norm()
    backbone, head = TinyBackbone(), nn.Linear(DIM, 2)
    backbone.load_state_dict(theta0)
    head.load_state_dict(head0)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1)
    for _ in range(steps):
        real = torch.randn(32, DIM, generator=g)
        fake = torch.randn(32, DIM, generator=g) + 1.5 * direction
        labels = torch.cat([torch.zeros(32), torch.ones(32)]).long()
        loss = nn.functional.cross_entropy(head(backbone(torch.cat([real, fake]))), 1 - labels if flip else labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (
        {k: v.detach().clone() for k, v in backbone.state_dict().items()},
        {k: v.detach().clone() for k, v in head.state_dict().items()},
    )


def scaled(theta0: dict[str, Tensor], specialist: dict[str, Tensor], factor: float) -> dict[str, Tensor]:
    return {k: theta0[k] + factor * (specialist[k] - theta0[k]) for k in theta0}


@pytest.fixture(scope="module")
def zoo():
    """θ₀, its head, four ordinary specialists, one trained with flipped labels, one scaled 10× (of family 7)."""
    theta0, head0 = pretrained()
    ordinary = {f"fam{i}": finetune(theta0, head0, i) for i in range(4)}
    flipped = finetune(theta0, head0, 5, flip=True)
    source = finetune(theta0, head0, 7)
    return theta0, head0, ordinary, flipped, (scaled(theta0, source[0], 10.0), source[1])


@pytest.mark.parametrize("n_ordinary", [1, 2, 3])
def test_flipped_and_scaled_specialists_are_flagged_by_name(zoo, n_ordinary):
    theta0, head0, ordinary, flipped, big = zoo
    members = {name: ordinary[name] for name in sorted(ordinary)[:n_ordinary]}
    members.update(poisoned=flipped, loud=big)  # N = 3, 4, 5
    report = screen_specialists(
        theta0, {f: sd for f, (sd, _) in members.items()}, {f: h for f, (_, h) in members.items()}, base_head=head0
    )
    assert report.flagged == ["loud", "poisoned"], report.format()
    by_statistic = {(flag.family, flag.statistic) for flag in report.flags}
    assert ("loud", "norm") in by_statistic and ("poisoned", "head_direction") in by_statistic
    # its backbone task vector is not anti-aligned (the flipped head absorbs the sign), so no cosine flag is needed
    assert report.stats["loud"].norm_ratio > 5
    assert report.stats["poisoned"].head_cosine < 0 < report.stats["poisoned"].head_agreement
    for name in sorted(ordinary)[:n_ordinary]:
        assert 1 / 3 < report.stats[name].norm_ratio < 3
    text = report.format()
    assert "| loud |" in text and "**loud** (norm" in text and "**poisoned** (head_direction" in text
    json.dumps(report.to_dict(), allow_nan=True)


def test_ordinary_specialists_raise_no_flag(zoo):
    theta0, head0, ordinary, _, _ = zoo
    report = screen_specialists(
        theta0, {f: sd for f, (sd, _) in ordinary.items()}, {f: h for f, (_, h) in ordinary.items()}, base_head=head0
    )
    assert report.flags == [], report.format()
    assert "No specialist flagged." in report.format()
    for stat in report.stats.values():
        assert stat.mean_cosine > 0.1 and stat.head_cosine > 0.1 and stat.top_direction_share is not None


def test_the_thresholds_are_arguments(zoo):
    theta0, _, ordinary, _, big = zoo
    members = {**{f: sd for f, (sd, _) in ordinary.items()}, "loud": big[0]}
    assert screen_specialists(theta0, members).flagged == ["loud"]
    assert screen_specialists(theta0, members, norm_factor=20.0).flagged == []
    with pytest.raises(ValueError, match="norm_factor"):
        screen_specialists(theta0, members, norm_factor=1.0)


@pytest.mark.parametrize("n_ordinary", [2, 4])
def test_a_task_vector_pointing_against_agreeing_others_gets_a_cosine_flag(zoo, n_ordinary):
    theta0, _, ordinary, _, _ = zoo
    members = {f: sd for f, (sd, _) in sorted(ordinary.items())[-n_ordinary:]}
    members["negated"] = scaled(theta0, ordinary["fam0"][0], -1.0)  # θ₀ − τ: every cosine to fam0's peers flips
    report = screen_specialists(theta0, members)
    assert report.flagged == ["negated"], report.format()
    assert [f.statistic for f in report.flags] == ["cosine"] and report.stats["negated"].mean_cosine < -0.1


def test_top_direction_share_by_hand_and_statistics_without_heads():
    # rank-one update: share 1; an orthogonal 4×4 update: σ₁² / ‖·‖²_F = 1/4
    theta0 = {"blocks.0.mlp.fc1.weight": torch.zeros(4, 4, dtype=torch.float64), "norm.weight": torch.ones(3)}
    u = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    specialists = {
        "rank1": {"blocks.0.mlp.fc1.weight": torch.outer(u, u), "norm.weight": torch.ones(3)},
        "flat": {"blocks.0.mlp.fc1.weight": 2.0 * q, "norm.weight": torch.ones(3)},
        "also_flat": {"blocks.0.mlp.fc1.weight": -3.0 * q.T, "norm.weight": torch.ones(3)},
    }
    report = screen_specialists(theta0, specialists)
    assert report.stats["rank1"].top_direction_share == pytest.approx(1.0, rel=1e-9)
    assert report.stats["flat"].top_direction_share == pytest.approx(0.25, rel=1e-6)
    assert report.stats["flat"].norm == pytest.approx(4.0)  # 2·‖q‖_F = 2·2
    assert report.stats["rank1"].head_cosine is None
    # the rank-one one holds 4× the median share: a spectrum flag with factor 3, none with factor 5
    assert ("rank1", "spectrum") in {(f.family, f.statistic) for f in report.flags}
    assert "spectrum" not in {f.statistic for f in screen_specialists(theta0, specialists, spectrum_factor=5).flags}


def test_two_specialists_get_statistics_and_a_note_but_no_flags(zoo):
    theta0, _, ordinary, _, big = zoo
    report = screen_specialists(theta0, {"fam0": ordinary["fam0"][0], "loud": big[0]})
    assert report.flags == [] and "need at least 3" in report.notes[0]
    assert report.stats["loud"].norm > 5 * report.stats["fam0"].norm


def test_screening_streams_each_tensor_once_and_refuses_bad_input(zoo):
    theta0, _, ordinary, _, _ = zoo
    reads = {f: Counter() for f in ordinary}
    lazy = {f: LazyStateDict(sd, reads[f]) for f, (sd, _) in ordinary.items()}
    screen_specialists(theta0, lazy)
    for counter in reads.values():
        assert set(counter.values()) == {1} and set(counter) == set(theta0)
    broken = {f: dict(sd) for f, (sd, _) in ordinary.items()}
    broken["fam1"]["blocks.0.mlp.fc1.weight"] = torch.full((2 * DIM, DIM), float("nan"))
    with pytest.raises(ValueError, match="'fam1'.*non-finite"):
        screen_specialists(theta0, broken)
    with pytest.raises(ValueError, match="heads"):
        screen_specialists(theta0, {f: sd for f, (sd, _) in ordinary.items()}, {"other": ordinary["fam0"][1]})


def test_report_type():
    assert ScreeningReport.__dataclass_fields__.keys() >= {"families", "stats", "flags", "thresholds", "notes"}
