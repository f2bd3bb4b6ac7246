"""r2m_lab.analysis on tiny state dicts and tiny models (fast), and stage=analyze through the real CLI (slow)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from r2m_lab.analysis import curves, directions, features, figures, interference, layers, spectra
from r2m_lab.analysis.auc import auc_or_none, one_class_note
from r2m_lab.analysis.lineage import check_same_base
from r2m_lab.analysis.similarity import PairedMoments
from r2m_lab.mergers import load_merger
from r2m_lab.mergers.r2m import components
from r2m_lab.weights import Checkpoint, save_detector

D = 6  # embedding width of the tiny ViT-like state dicts


def tiny_vit(seed: int = 0, depth: int = 2) -> dict[str, torch.Tensor]:
    """θ₀ with timm ViT key names: embeddings, `depth` blocks (fused qkv), final norm."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "cls_token": torch.randn(1, 1, D, generator=g),
        "pos_embed": torch.randn(1, 5, D, generator=g),
        "patch_embed.proj.weight": torch.randn(D, 3, 2, 2, generator=g),
        "patch_embed.proj.bias": torch.randn(D, generator=g),
    }
    for b in range(depth):
        state |= {
            f"blocks.{b}.norm1.weight": torch.ones(D),
            f"blocks.{b}.attn.qkv.weight": torch.randn(3 * D, D, generator=g),
            f"blocks.{b}.attn.qkv.bias": torch.randn(3 * D, generator=g),
            f"blocks.{b}.attn.proj.weight": torch.randn(D, D, generator=g),
            f"blocks.{b}.mlp.fc1.weight": torch.randn(2 * D, D, generator=g),
            f"blocks.{b}.mlp.fc2.weight": torch.randn(D, 2 * D, generator=g),
        }
    state |= {"norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)}
    return state


def specialists_of(theta0: dict[str, torch.Tensor], n: int = 3, scale: float = 0.1) -> dict[str, dict]:
    """n specialists: a shared direction plus a private one each (so the Real core is real)."""
    g = torch.Generator().manual_seed(1)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    return {
        f"f{i}": {k: v + scale * (shared[k] + torch.randn(v.shape, generator=g)) for k, v in theta0.items()}
        for i in range(n)
    }


def heads_of(names, seed: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: {"weight": torch.randn(2, D, generator=g), "bias": torch.randn(2, generator=g)} for name in names}


# ------------------------------------------------------------------------------------------------- similarity


def gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The n×n Gram definition: ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖), K = XXᵀ, L = YYᵀ."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / (np.linalg.norm(k) * np.linalg.norm(l_)))


def test_streamed_cka_equals_the_gram_definition_whatever_the_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64) + 100.0  # a large offset: the shift keeps it exact
    y = x @ torch.randn(7, 5, generator=g, dtype=torch.float64) + 0.5 * torch.randn(50, 5, generator=g).double()
    expected = gram_cka(x.numpy(), y.numpy())
    for sizes in ([50], [1, 49], [13, 13, 13, 11]):
        moments = PairedMoments()
        for xb, yb in zip(x.split(sizes), y.split(sizes), strict=True):
            moments.update(xb, yb)
        assert moments.n == 50
        assert moments.cka() == pytest.approx(expected, rel=1e-9)
        torch.testing.assert_close(moments.mean_x, x.mean(0))
        torch.testing.assert_close(moments.mean_y, y.mean(0))
    assert 0 < expected < 1


def test_cka_is_one_under_rotation_scaling_and_shift_and_cosine_is_the_mean():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    moments = PairedMoments()
    moments.update(x, 3.0 * x @ q + 2.0)
    assert moments.cka() == pytest.approx(1.0, abs=1e-12)
    y = x + 0.3 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    moments = PairedMoments()
    moments.update(x[:25], y[:25])
    moments.update(x[25:], y[25:])
    expected = torch.nn.functional.cosine_similarity(x, y, dim=1).mean()
    assert moments.mean_cosine() == pytest.approx(float(expected), rel=1e-12)


def test_cka_is_none_where_it_does_not_exist():
    moments = PairedMoments()
    assert moments.cka() is None and moments.mean_cosine() is None and moments.mean_x is None
    moments.update(torch.ones(1, 3), torch.ones(1, 3))
    assert moments.cka() is None  # one frame: nothing to centre
    constant = PairedMoments()
    constant.update(torch.ones(4, 3), torch.randn(4, 3))
    assert constant.cka() is None  # a constant feature set has no centred Gram
    wide = PairedMoments()
    wide.update(torch.randn(4, 3), torch.randn(4, 5))
    assert wide.mean_cosine() is None and wide.cka() is not None


def test_collect_streams_pairs_per_class_and_class_means():
    g = torch.Generator().manual_seed(4)
    a, b = nn.Linear(5, 4), nn.Linear(5, 4)
    x = torch.randn(30, 5, generator=g)
    labels = torch.tensor([0, 1] * 15)
    batches = [(x[i : i + 7], labels[i : i + 7]) for i in range(0, 30, 7)]
    stats = features.collect({"a": a, "b": b}, [("a", "b")], batches)
    with torch.no_grad():
        fa, fb = a(x).double(), b(x).double()
    for value, name in enumerate(features.CLASSES):
        mask = labels == value
        assert stats.counts[name] == 15
        expected = gram_cka(fa[mask].numpy(), fb[mask].numpy())
        assert stats.similarity()[name]["a|b"]["cka"] == pytest.approx(expected, rel=1e-9)
        torch.testing.assert_close(stats.means[name]["a"], fa[mask].mean(0))
    real_only = features.collect({"a": a, "b": b}, [("a", "b")], [(x[:4], torch.zeros(4))])
    assert set(real_only.similarity()) == {"real"}  # no fake frame: no fake entry, never NaN
    with pytest.raises(ValueError, match="not pooled"):
        features.collect({"a": nn.Identity(), "b": b}, [("a", "b")], [(torch.randn(2, 3, 5), torch.zeros(2))])
    with pytest.raises(ValueError, match="not given"):
        features.collect({"a": a}, [("a", "c")], [])


# ------------------------------------------------------------------------------------------------- directions


def test_angles_and_head_alignment_by_hand():
    assert directions.angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(45.0)
    assert directions.angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])) == pytest.approx(180.0)
    assert directions.angle_degrees(torch.zeros(2), torch.ones(2)) is None
    means = {
        "fam": {
            "real": {"s": torch.tensor([0.0, 0.0]), "m": torch.tensor([1.0, 1.0])},
            "fake": {"s": torch.tensor([1.0, 0.0]), "m": torch.tensor([1.0, 2.0])},  # d_s = e1, d_m = e2
        },
        "one_class": {"real": {"s": torch.zeros(2), "m": torch.zeros(2)}},
    }
    heads = {
        "s": {"weight": torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "bias": torch.zeros(2)},  # direction e1
        "m": {"weight": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "bias": torch.zeros(2)},  # direction e2
    }
    report = directions.direction_report(means, [("s", "m")], heads)
    assert report["pairs"]["s|m"] == {"fam": pytest.approx(90.0), "one_class": None}
    assert report["feature_vs_head"]["s"]["fam"] == pytest.approx(0.0)
    assert report["feature_vs_head"]["m"]["fam"] == pytest.approx(0.0)
    assert report["separation_norm"]["s"] == {"fam": 1.0, "one_class": None}
    alignment = directions.head_alignment(heads)
    assert alignment["cosines"][0][1] == pytest.approx(0.0) and alignment["cosines"][0][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no head"):
        directions.direction_report(means, [("s", "x")], heads)


# ------------------------------------------------------------------------------------------- layers, lineage, AUC


def test_layer_groups_of_timm_keys():
    assert layers.layer_group("blocks.11.attn.qkv.weight") == "block11"
    assert layers.layer_group("cls_token") == layers.layer_group("norm_pre.weight") == "embed"
    assert layers.layer_group("patch_embed.proj.weight") == "embed"
    assert layers.layer_group("norm.weight") == layers.layer_group("fc_norm.bias") == "post"
    assert layers.groups_of(tiny_vit(depth=11)) == ["embed", *[f"block{i}" for i in range(11)], "post"]
    theta0, other = tiny_vit(0), tiny_vit(5)
    hybrid = layers.swap_group(theta0, other, "block1")
    assert all(hybrid[k] is (other if k.startswith("blocks.1.") else theta0)[k] for k in theta0)
    with pytest.raises(ValueError, match="no backbone key is in layer group 'block7'"):
        layers.swap_group(theta0, other, "block7")


def test_checkpoints_of_another_theta0_are_refused_by_name(tmp_path):
    head = {"weight": torch.zeros(2, D), "bias": torch.zeros(2)}
    state = {"cls_token": torch.zeros(1, 1, D)}
    for name, base_hash in (("base", "aaaa"), ("ok", "aaaa"), ("stranger", "bbbbbbbb")):
        save_detector(tmp_path / f"{name}.safetensors", state, head, {"kind": "specialist", "base_hash": base_hash})
    base = Checkpoint(tmp_path / "base.safetensors")
    check_same_base(base, {"ok": Checkpoint(tmp_path / "ok.safetensors")})
    with pytest.raises(ValueError, match=r"specialist:x \(.*stranger.safetensors: θ₀ bbbbbbbb\)") as err:
        check_same_base(
            base,
            {
                "ok": Checkpoint(tmp_path / "ok.safetensors"),
                "specialist:x": Checkpoint(tmp_path / "stranger.safetensors"),
            },
        )
    assert "ok (" not in str(err.value)


def test_one_class_says_so_instead_of_nan():
    assert auc_or_none(np.array([0.2, 0.9]), np.array([1, 1])) is None
    assert auc_or_none(np.array([0.2, 0.9]), np.array([0, 1])) == 1.0
    note = one_class_note("swap", np.array([0, 0, 0]), "val")
    assert "swap" in note and "3 real and 0 fake" in note and "val" in note
    assert one_class_note("swap", np.array([0, 1]), "val") is None


# ------------------------------------------------------------------------------------------- R²M components, spectra


@pytest.mark.parametrize("knobs", [{}, {"svd": "exact", "eta": 3.0}, {"center": True, "block_weight": "equal"}])
def test_components_rebuild_the_merge_bit_for_bit(knobs):
    theta0 = tiny_vit()
    specialists = specialists_of(theta0)
    merger = load_merger("r2m", rank_ratio=0.34, **knobs)
    merged = merger(theta0, specialists, heads_of(specialists))
    parts = components(theta0, specialists, merger, spectra=True)
    rebuilt = parts.backbone(theta0)
    assert list(rebuilt) == list(merged.backbone)
    assert all(torch.equal(rebuilt[k], merged.backbone[k]) for k in theta0)
    without_timings = {k: v for k, v in merged.diagnostics.items() if k != "timings_s"}
    assert {k: v for k, v in parts.diagnostics.items() if k != "timings_s"} == without_timings
    core_only = parts.backbone(theta0, 0.0)
    assert not torch.equal(core_only["blocks.0.mlp.fc1.weight"], rebuilt["blocks.0.mlp.fc1.weight"])


def test_residual_spectra_before_and_after_truncation():
    theta0 = tiny_vit()
    specialists = specialists_of(theta0)
    merger = load_merger("r2m", rank_ratio=0.34, svd="exact")
    parts = components(theta0, specialists, merger, spectra=True)
    key = "blocks.1.attn.qkv.weight"
    before, after = parts.spectra[key]
    assert before.shape == after.shape == (3, 3, D)  # N specialists, q/k/v, min(m, n) values
    names = parts.names
    residual = torch.stack([specialists[n][key].double() - theta0[key].double() for n in names]) - parts.core[key]
    expected = torch.linalg.svdvals(residual.unflatten(1, (3, D)))
    torch.testing.assert_close(before, expected)
    q = parts.diagnostics["kept_rank"][key]
    assert q == 2
    torch.testing.assert_close(after[..., :q], before[..., :q])  # the exact truncation keeps the top q
    assert float(after[..., q:].abs().max()) < 1e-10
    report = spectra.residual_spectra(parts, top=4)
    entry = report["matrices"][f"{key}:k"]
    assert entry["group"] == "block1" and entry["kept_rank"] == q and len(entry["families"]["f0"]["before"]) == 4
    kept = entry["families"]["f0"]["energy_kept"]
    assert kept == pytest.approx(float(before[0, 1, :q].square().sum() / before[0, 1].square().sum()))
    assert set(report["energy_kept_by_group"]) == {"block0", "block1"}
    with pytest.raises(ValueError, match="spectra=True"):
        spectra.residual_spectra(components(theta0, specialists, merger))


def test_gram_spectrum_and_energy_per_block_add_up():
    theta0 = tiny_vit()
    specialists = specialists_of(theta0)
    merger = load_merger("r2m")
    parts = components(theta0, specialists, merger)
    merged = merger(theta0, specialists, heads_of(specialists)).backbone
    gram = spectra.gram_spectrum(parts)
    norms = parts.diagnostics["task_vector_norms"]
    assert sum(gram["eigenvalues"]) == pytest.approx(sum(v**2 for v in norms.values()), rel=1e-9)
    assert gram["energy_share"][0] > 0.5  # the shared direction dominates
    blocks = spectra.block_energy(theta0, specialists, parts, {"r2m": merged})
    assert blocks["groups"] == ["embed", "block0", "block1", "post"]
    for name, by_group in blocks["task_vectors"].items():
        assert sum(by_group.values()) == pytest.approx(norms[name] ** 2, rel=1e-9)
    assert sum(blocks["core"].values()) == pytest.approx(parts.diagnostics["core_norm"] ** 2, rel=1e-9)
    assert sum(blocks["residual"].values()) == pytest.approx(parts.diagnostics["residual_norm"] ** 2, rel=1e-9)
    assert sum(blocks["merged_delta"]["r2m"].values()) > 0
    real = spectra.real_subspace_energy(parts)
    assert all(0 <= real["core_fraction"][n] <= 1 for n in parts.names)


# --------------------------------------------------------------------------------------- curves and interference


def test_lambda_one_is_averaging_and_eta_path_passes_through_the_merge():
    theta0 = tiny_vit()
    specialists = specialists_of(theta0)
    heads = heads_of(specialists)
    average = load_merger("average")(theta0, specialists, heads).backbone
    mean = curves.mean_task_vector(theta0, specialists)
    assert all(torch.equal(curves.scaled_backbone(theta0, mean, 1.0)[k], average[k]) for k in theta0)
    assert all(torch.equal(curves.scaled_backbone(theta0, mean, 0.0)[k], theta0[k]) for k in theta0)

    merger = load_merger("r2m", eta=2.0)
    merged = merger(theta0, specialists, heads).backbone
    parts = components(theta0, specialists, merger)
    seen = []

    def score(backbone, head):
        seen.append(backbone)
        return {"f0": float(backbone["cls_token"].sum()), "pooled": None}

    out = curves.interpolation_curves(theta0, specialists, heads, parts, [0.0, 2.0], [1.0], score)
    assert [p["eta"] for p in out["eta"]] == [0.0, 2.0] and out["knob_eta"] == 2.0
    assert all(torch.equal(seen[1][k], merged[k]) for k in theta0)  # η = the knobs' η: the merge itself
    assert out["eta"][0]["auc"]["pooled"] is None and out["lambda"][0]["lambda"] == 1.0
    with pytest.raises(ValueError, match="eta grid must hold finite numbers"):
        curves.eta_curve(theta0, parts, heads["f0"], [0.0, math.inf], score)
    with pytest.raises(ValueError, match="lambda grid must be a non-empty list"):
        curves.lambda_curve(theta0, specialists, heads["f0"], [], score)


def test_interference_swaps_one_group_at_a_time():
    theta0 = tiny_vit()
    specialists = specialists_of(theta0, n=2)
    heads = heads_of(specialists)
    merged = load_merger("average")(theta0, specialists, heads)

    def distance(family, backbone, head):
        # a stand-in for AUC: minus the distance to the family's own specialist (its own weights score 0)
        own = specialists[family]
        weights = sum(float((backbone[k] - own[k]).square().sum()) for k in own)
        return -(weights + float((head["weight"] - heads[family]["weight"]).square().sum()))

    report = interference.layer_interference(specialists, heads, merged.backbone, merged.head, distance, desc=None)
    assert report["groups"] == ["embed", "block0", "block1", "post", "head"]
    f0 = report["families"]["f0"]
    assert f0["specialist_auc"] == 0.0 and f0["merged_auc"] < f0["delta"]["block0"] < 0
    block0 = sum(
        float((merged.backbone[k] - specialists["f0"][k]).square().sum()) for k in theta0 if k.startswith("blocks.0.")
    )
    assert f0["delta"]["block0"] == pytest.approx(-block0)
    head = float((merged.head["weight"] - heads["f0"]["weight"]).square().sum())
    assert f0["delta"]["head"] == pytest.approx(-head)
    assert sum(f0["delta"].values()) == pytest.approx(f0["merged_auc"], rel=1e-6)  # the groups partition the weights


# ------------------------------------------------------------------------------------------------------- figures


def test_figures_draw_missing_values_as_na_not_nan(tmp_path):
    similarity = {
        "swap": {"real": {"s|m": {"cka": 0.9, "mean_cosine": 0.99}}, "fake": {"s|m": {"cka": 0.5, "mean_cosine": 0.9}}},
        "edit": {"real": {"s|m": {"cka": 0.8, "mean_cosine": None}}},  # one class in the split
    }
    assert figures.plot_similarity(similarity, "cka", tmp_path / "cka.png", "CKA").is_file()
    curve_data = {
        "eta": [{"eta": e, "auc": {"swap": 0.5 + e / 10, "edit": None, "pooled": 0.6}} for e in (0.0, 1.0, 2.0)],
        "lambda": [{"lambda": v, "auc": {"swap": 0.7, "edit": None, "pooled": 0.6}} for v in (0.0, 1.0)],
        "knob_eta": 1.0,
    }
    assert figures.plot_interpolation(curve_data, tmp_path / "curves.png", "val").is_file()
    report = {"groups": ["embed", "head"], "families": {"swap": {"delta": {"embed": -0.1, "head": None}}}}
    assert figures.plot_interference(report, tmp_path / "interference.png", "Δ AUC").is_file()
    angles = {"pairs": {"s|m": {"swap": 10.0, "edit": None}}}
    assert figures.plot_directions(angles, tmp_path / "directions.png", "angles").is_file()
    heads = {"labels": ["s", "m"], "cosines": [[1.0, 0.5], [0.5, 1.0]]}
    assert figures.plot_head_alignment(heads, tmp_path / "heads.png", "heads").is_file()
    theta0 = tiny_vit()
    specialists = specialists_of(theta0)
    parts = components(theta0, specialists, load_merger("r2m"), spectra=True)
    report = spectra.spectra_report(theta0, specialists, parts, top=3)
    assert figures.plot_spectrum(report["gram"], report["real_subspace"], tmp_path / "spectrum.png").is_file()
    assert figures.plot_block_energy(report["blocks"], tmp_path / "blocks.png").is_file()
    order = spectra.matrix_labels(report["residual_spectra"])
    assert order[0].startswith("blocks.0.") and order[-1].startswith("blocks.1.")
    assert figures.plot_residual_spectra(report["residual_spectra"], order, tmp_path / "residual.png").is_file()
    json.dumps(report)  # every number is JSON-serialisable


# ------------------------------------------------------------------------------------------------ stage config


def test_stage_refuses_bad_knobs_before_any_work(make_cfg):
    from r2m_lab.stages.analyze import analysis_parts, analysis_split, analyze, r2m_knobs

    cfg = make_cfg("stage=analyze")
    assert analysis_parts(cfg) == ["spectra", "similarity", "directions", "curves", "interference"]
    assert analysis_split(cfg) == "val"
    assert r2m_knobs(cfg).rank_ratio == 0.1
    assert r2m_knobs(make_cfg("stage=analyze", "merger=average", "+stage.r2m.eta=5.0")).eta == 5.0
    with pytest.raises(ValueError, match="stage.parts"):
        analyze(make_cfg("stage=analyze", "stage.parts=[spectra,nope]"))
    with pytest.raises(ValueError, match="stage.split must be val or test"):
        analyze(make_cfg("stage=analyze", "stage.split=train"))
    with pytest.raises(ValueError, match="stage.eta_grid"):
        analyze(make_cfg("stage=analyze", "stage.eta_grid=[]"))
    with pytest.raises(ValueError, match="families \\['nope'\\]"):
        analyze(make_cfg("stage=analyze", "stage.specialists={nope: /x.safetensors, swap: /y.safetensors}"))


# --------------------------------------------------------------------------------------------------- real CLI


@pytest.mark.slow
def test_analyze_smoke_cli(trained_root: Path, tmp_path: Path):
    from tests.test_cli import run_cli

    # the specialists only: other tests may have merged into the shared session root; analyze merges what it lacks
    shutil.copytree(trained_root / "artifacts", tmp_path / "artifacts", ignore=shutil.ignore_patterns("merged"))
    proc = run_cli("stage=analyze", "debug=smoke", "hydra.run.dir=run", root=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads((run / "analysis.json").read_text())
    assert result["split"] == "val" and result["curves"]["split"] == "val"
    assert set(result["parts"]) == {"spectra", "similarity", "directions", "curves", "interference"}
    figures_written = sorted(p.name for p in (run / "analysis").glob("*.png"))
    assert figures_written == sorted(
        [
            "block_energy.png",
            "curves.png",
            "directions.png",
            "head_alignment.png",
            "interference_merged_r2m.png",
            "residual_spectra.png",
            "similarity_cka.png",
            "similarity_mean_cosine.png",
            "spectrum.png",
        ]
    )
    families = ["swap", "reenact", "synthesis", "edit"]
    assert set(result["similarity"]["families"]) == set(families)
    assert [p["eta"] for p in result["curves"]["eta"]][:2] == [0.0, 0.5]
    assert set(result["curves"]["eta"][0]["auc"]) == {*families, "pooled"}
    groups = result["interference"]["merged:r2m"]["groups"]
    assert groups == ["embed", "block0", "block1", "post", "head"]
