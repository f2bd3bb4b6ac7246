"""TIES, DARE, CART, TSV-M and Iso-C against answers computed by another route, and the merger invariants."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from r2m_lab.mergers import cart, dare, load_merger, merger_names, ties
from r2m_lab.mergers.task_vectors import split_qkv, stable_seed
from r2m_lab.weights import LazyStateDict as FileStateDict
from r2m_lab.weights import save_detector
from tests.test_mergers import (
    FAMILY_SEEDED,
    PASSES,
    LazyStateDict,
    assert_same_backbone,
    broken_cases,
    delta_of,
    heads_for,
    perturbed,
    run,
    tiny_vit,
    toy_theta0,
    with_deltas,
)

torch.set_num_threads(1)

F64 = torch.float64
MATRIX_KEYS = [
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.proj.weight",
    "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc2.weight",
]


def three(theta0: Mapping[str, Tensor], scale: float = 0.05) -> dict[str, dict[str, Tensor]]:
    return {f: perturbed(theta0, s, scale) for f, s in [("a", 1), ("b", 2), ("c", 3)]}


def split_state(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The same weights with every fused qkv stored as split q, k, v keys."""
    out = {}
    for key, value in sd.items():
        if key.endswith("attn.qkv.weight"):
            stem = key[: -len("qkv.weight")]
            q, k, v = split_qkv(value)
            out.update({stem + "q.weight": q, stem + "k.weight": k, stem + "v.weight": v})
        else:
            out[key] = value
    return out


def np_tau(theta0: Mapping[str, Tensor], specialist: Mapping[str, Tensor], key: str) -> np.ndarray:
    return specialist[key].double().numpy() - theta0[key].double().numpy()


def np_truncate(matrix: np.ndarray, q: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :q] * s[:q]) @ vt[:q]


def np_blocks(key: str, matrix: np.ndarray) -> list[np.ndarray]:
    return np.split(matrix, 3, axis=0) if key.endswith("qkv.weight") else [matrix]


# ------------------------------------------------------------------------------------------------------ TIES


def ties_by_loops(taus: list[np.ndarray], density: float, merge_fn: str = "disjoint_mean") -> np.ndarray:
    """TIES on whole flattened task vectors (N lists of D numbers), entry by entry in plain Python."""
    d = len(taus[0])
    k = min(d, int(density * d) + 1)  # ⌊density·D⌋ + 1 largest magnitudes, the TIES authors' count
    trimmed = []
    for tau in taus:
        threshold = sorted((abs(x) for x in tau), reverse=True)[k - 1]
        trimmed.append([x if abs(x) >= threshold else 0.0 for x in tau])
    signs = []
    for p in range(d):
        total = sum(t[p] for t in trimmed)
        signs.append((total > 0) - (total < 0))
    majority = (sum(signs) > 0) - (sum(signs) < 0)
    out = []
    for p in range(d):
        values = [t[p] for t in trimmed]
        sign = signs[p] or majority
        agree = [v for v in values if v != 0 and ((v > 0) if sign > 0 else (v < 0))]
        if not agree:
            out.append(0.0)
        else:
            out.append(sum(agree) if merge_fn == "sum" else sum(agree) / len(agree))
    return np.array(out)


def small_ties_case() -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Two keys (a 3×2 matrix and a 4-vector, D = 10), three tasks with distinct magnitudes (no ties)."""
    theta0 = {"blocks.0.attn.proj.weight": torch.zeros(3, 2), "norm.bias": torch.ones(4)}
    deltas = {
        "a": [[0.9, -0.1], [0.3, -0.7], [0.05, 0.2]], "a_b": [0.6, -0.4, 0.15, -0.25],
        "b": [[-0.8, 0.35], [0.45, 0.1], [-0.55, 0.02]], "b_b": [-0.3, 0.65, -0.12, 0.5],
        "c": [[0.33, -0.6], [-0.2, 0.75], [0.4, -0.08]], "c_b": [0.22, 0.11, -0.95, 0.07],
    }  # fmt: skip
    specialists = {
        f: with_deltas(
            theta0, {"blocks.0.attn.proj.weight": torch.tensor(deltas[f]), "norm.bias": torch.tensor(deltas[f + "_b"])}
        )
        for f in "abc"
    }
    return theta0, specialists


@pytest.mark.parametrize("merge_fn", ["disjoint_mean", "sum"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_global_trim_by_hand(density, merge_fn):
    theta0, specialists = small_ties_case()
    keys = list(theta0)
    taus = [np.concatenate([np_tau(theta0, specialists[f], k).ravel() for k in keys]).tolist() for f in "abc"]
    expected = ties_by_loops(taus, density, merge_fn) * 0.7
    result = run("ties", theta0, specialists, heads_for("abc"), density=density, lam=0.7, merge_fn=merge_fn)
    delta = delta_of(result, theta0)
    actual = np.concatenate([delta[k].numpy().ravel() for k in keys])
    np.testing.assert_allclose(actual, expected, atol=1e-7)  # float32 rounding of θ₀ + δ only


def test_ties_per_tensor_trim_by_hand():
    theta0, specialists = small_ties_case()
    result = run("ties", theta0, specialists, heads_for("abc"), density=0.5, trim_scope="per_tensor")
    delta = delta_of(result, theta0)
    for key in theta0:
        taus = [np_tau(theta0, specialists[f], key).ravel().tolist() for f in "abc"]
        np.testing.assert_allclose(delta[key].numpy().ravel(), ties_by_loops(taus, 0.5), atol=1e-7)
    assert set(result.diagnostics["thresholds"]) == set(theta0)
    # a global threshold differs here: the matrix holds most of the large magnitudes
    global_delta = delta_of(run("ties", theta0, specialists, heads_for("abc"), density=0.5), theta0)
    assert not torch.allclose(global_delta["norm.bias"], delta["norm.bias"])


def test_ties_elected_sign_and_disjoint_mean_on_one_entry():
    # density 1: values +3, +1, −2 → elected +, disjoint mean (3 + 1)/2 = 2, disjoint sum 4;
    # values +2, −2 (and 0) cancel exactly: they take the majority sign of the other entries (+), so 2;
    # values −1, −4, +0.5 → elected −, mean −2.5, sum −5
    theta0 = {"norm.bias": torch.zeros(3)}
    values = [[3.0, 2.0, -1.0], [1.0, -2.0, -4.0], [-2.0, 0.0, 0.5]]
    specialists = {f: {"norm.bias": torch.tensor(v)} for f, v in zip("abc", values, strict=True)}
    heads = heads_for("abc")
    # elected signs +, ?, −: a tie, so the cancelling entry keeps its negative value (the authors' selection rule)
    mean = run("ties", theta0, specialists, heads, density=1.0)
    total = run("ties", theta0, specialists, heads, density=1.0, merge_fn="sum").backbone["norm.bias"]
    assert mean.backbone["norm.bias"].tolist() == [2.0, -2.0, -2.5] and total.tolist() == [4.0, -2.0, -5.0]
    assert mean.diagnostics["majority_sign"] == 0 and mean.diagnostics["zero_sign_entries"] == 1
    # one more positive entry makes the majority +: the cancelling entry becomes +2
    theta0 = {"norm.bias": torch.zeros(4)}
    specialists = {f: {"norm.bias": torch.tensor([*v, 1.0])} for f, v in zip("abc", values, strict=True)}
    out = run("ties", theta0, specialists, heads, density=1.0)
    assert out.backbone["norm.bias"].tolist() == [2.0, 2.0, -2.5, 1.0] and out.diagnostics["majority_sign"] == 1


def concatenated_thresholds(theta0, specialists, density) -> list[float]:
    out = []
    for f in sorted(specialists):
        tau = torch.cat([(specialists[f][k].double() - theta0[k].double()).reshape(-1) for k in theta0])
        d = tau.numel()
        out.append(float(tau.abs().kthvalue(max(1, d - int(density * d))).values))  # the authors' k-th smallest
    return out


@pytest.mark.parametrize("density", [1e-6, 0.003, 0.2, 0.5, 0.999, 1.0])
def test_ties_streaming_threshold_equals_the_concatenated_one_with_many_ties(density):
    g = torch.Generator().manual_seed(0)
    theta0 = {
        "blocks.0.mlp.fc1.weight": torch.randn(300, 200, generator=g),
        "blocks.0.mlp.fc1.bias": torch.randn(300, generator=g),
        "blocks.0.mlp.fc2.weight": torch.randn(200, 300, generator=g),  # unchanged by every specialist
        "norm.weight": torch.ones(7),
    }
    specialists = {}
    for f in "abc":
        deltas = {
            # quantised magnitudes: thousands of entries share each value, so the k-th one is tied many times
            "blocks.0.mlp.fc1.weight": torch.randint(-6, 7, (300, 200), generator=g) * 0.125,
            "blocks.0.mlp.fc1.bias": torch.randn(300, generator=g) * 1e-3,
            "norm.weight": torch.randn(7, generator=g),
        }
        specialists[f] = with_deltas(theta0, deltas)
    found = ties.global_thresholds(theta0, specialists, sorted(specialists), density)
    assert found.entries == 300 * 200 * 2 + 300 + 7
    assert found.thresholds.tolist() == concatenated_thresholds(theta0, specialists, density)
    result = run("ties", theta0, specialists, heads_for("abc"), density=density)
    for f, fraction in result.diagnostics["kept_fraction"].items():
        # ties at the threshold are all kept: at least k entries (unless fewer than k are non-zero)
        tau = torch.cat([(specialists[f][k].double() - theta0[k].double()).reshape(-1) for k in theta0])
        expected = int((tau.abs() >= result.diagnostics["thresholds"][f]).logical_and(tau != 0).sum())
        assert fraction == pytest.approx(expected / found.entries)


def test_ties_streaming_threshold_on_continuous_values_and_tiny_magnitudes():
    # magnitudes spread over many octaves (1e-30 .. 1e3) and a task with fewer non-zeros than k
    g = torch.Generator().manual_seed(1)
    theta0 = {"a": torch.zeros(5000, dtype=torch.float64), "b": torch.zeros(40, 50, dtype=torch.float64)}
    specialists = {
        "x": {"a": torch.randn(5000, generator=g, dtype=F64) * 10 ** torch.empty(5000, dtype=F64).uniform_(-30, 3),
              "b": torch.randn(40, 50, generator=g, dtype=F64)},
        "y": {"a": torch.zeros(5000, dtype=F64), "b": torch.zeros(40, 50, dtype=F64)},
        "z": {"a": torch.zeros(5000, dtype=F64), "b": torch.eye(40, 50, dtype=F64)},
    }  # fmt: skip
    for density in [0.01, 0.3, 0.9]:
        found = ties.global_thresholds(theta0, specialists, ["x", "y", "z"], density)
        assert found.thresholds.tolist() == concatenated_thresholds(theta0, specialists, density)
        assert found.thresholds[1] == 0 and found.thresholds[2] == 0  # 40 non-zeros < k: every one is kept


def bracket_case(dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Keys large enough for the sampled bracket (several SAMPLE_STRIDE groups), per-key scales a decade apart, one
    quantised key whose magnitudes tie thousands of times, a key no specialist changes, and a small tail key. Weights
    at a ViT's initial scale (0.02), so that bfloat16 keeps the updates."""
    g = torch.Generator().manual_seed(11)
    theta0 = {
        "blocks.0.attn.qkv.weight": (0.02 * torch.randn(96, 512, generator=g)).to(dtype),
        "blocks.0.mlp.fc1.weight": (0.02 * torch.randn(128, 300, generator=g)).to(dtype),
        "blocks.0.mlp.fc2.weight": (0.02 * torch.randn(300, 128, generator=g)).to(dtype),  # unchanged by all
        "blocks.0.norm1.bias": torch.zeros(77, dtype=dtype),
    }
    specialists = {}
    for i, f in enumerate("abc"):
        deltas = {
            "blocks.0.attn.qkv.weight": torch.randn(96, 512, generator=g) * 10.0 ** (i - 4),
            "blocks.0.mlp.fc1.weight": torch.randint(-40, 41, (128, 300), generator=g) * 2.0**-12,
            "blocks.0.norm1.bias": torch.randn(77, generator=g) * 1e-2,
        }
        specialists[f] = {k: (v + deltas[k]).to(dtype) if k in deltas else v.clone() for k, v in theta0.items()}
    return theta0, specialists


@pytest.mark.parametrize("sample_target", [ties.SAMPLE_TARGET, 4096])  # the whole task vector | runs, 1 in 30
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.45])
def test_ties_bracket_thresholds_are_exact(dtype, density, sample_target, monkeypatch):
    monkeypatch.setattr(ties, "SAMPLE_TARGET", sample_target)
    theta0, specialists = bracket_case(dtype)
    names = sorted(specialists)
    entries = sum(v.numel() for v in theta0.values())
    stride = ties.SAMPLE_RUN * max(1, entries // sample_target)
    sample, weights = ties.sample_magnitudes(theta0, specialists, names, list(theta0), stride)
    assert float(weights.sum()) == entries  # every entry is stood for exactly once, remainders included
    # a model smaller than the target is sampled whole (the bracket is then exact); a larger one in runs
    assert sample.shape[1] == entries if sample_target >= entries else sample.shape[1] < entries / 10
    found = ties.global_thresholds(theta0, specialists, names, density)
    if density <= 0.2 or sample_target >= entries:
        # the sampled bracket held: one chunked pass, no histogram (at 0.45 a sparse sample's wide bracket may reach
        # task a's 44 % of zeros, and the histogram takes over: exact all the same)
        assert found.method == "bracket"
    assert found.thresholds.tolist() == concatenated_thresholds(theta0, specialists, density)
    assert (
        found.thresholds.tolist() == ties.histogram_thresholds(theta0, specialists, names, density).thresholds.tolist()
    )
    if sample_target >= entries:  # it gathered a thin slice around the k-th value, not the task vector
        assert 0 < max(found.gathered) < 0.2 * found.entries


def test_ties_bracket_gathers_across_chunks_and_grows_its_buffer(monkeypatch):
    # chunks of 256 entries and a first buffer of ~300 values: the gathered ~5 000 per task overflow it several times
    monkeypatch.setattr(ties, "ELEMENTWISE_CHUNK", 256)
    monkeypatch.setattr(ties, "GATHER_CAPACITY", 0.01)
    theta0, specialists = bracket_case()
    names = sorted(specialists)
    found = ties.bracket_thresholds(theta0, specialists, names, 0.2)
    assert found is not None and found.method == "bracket"
    assert min(found.gathered) > 4 * 300
    assert found.thresholds.tolist() == concatenated_thresholds(theta0, specialists, 0.2)


def test_ties_bracket_that_misses_falls_back_to_the_histogram(monkeypatch, caplog):
    theta0, specialists = bracket_case()
    names = sorted(specialists)
    sample = ties.sample_magnitudes

    def too_large(*args):
        magnitudes, weights = sample(*args)
        return magnitudes * 10, weights

    # a sample whose magnitudes are 10× too large puts the bracket far above the k-th value: the pass finds fewer than
    # k entries above it and more than the bracket, so the exact route must take over
    monkeypatch.setattr(ties, "sample_magnitudes", too_large)
    with caplog.at_level("INFO", logger="r2m_lab.mergers.ties"):
        assert ties.bracket_thresholds(theta0, specialists, names, 0.2) is None
    assert "missed a's k-th value" in caplog.text  # the slower route is announced, not silent
    found = ties.global_thresholds(theta0, specialists, names, 0.2)
    assert found.method == "histogram"
    assert found.thresholds.tolist() == concatenated_thresholds(theta0, specialists, 0.2)
    result = run("ties", theta0, specialists, heads_for("abc"), density=0.2)
    assert result.diagnostics["threshold_method"] == "histogram"
    monkeypatch.undo()
    again = run("ties", theta0, specialists, heads_for("abc"), density=0.2)
    assert again.diagnostics["threshold_method"] == "bracket"
    assert_same_backbone(again.backbone, result.backbone)  # the route changes the time, never the merge


def test_ties_density_one_identical_specialists_give_that_specialist():
    vit = tiny_vit()
    specialist = perturbed(vit, 1)
    specialists = {f: {k: v.clone() for k, v in specialist.items()} for f in ["fs", "fr", "efs"]}
    heads = heads_for(specialists, 24)
    for scope in ties.TRIM_SCOPES:
        assert_same_backbone(run("ties", vit, specialists, heads, density=1.0, trim_scope=scope).backbone, specialist)
    # below density 1 trimming bites, and the sum adds N copies
    assert not torch.equal(run("ties", vit, specialists, heads).backbone["cls_token"], specialist["cls_token"])


# ------------------------------------------------------------------------------------------------------ DARE


def test_dare_keeps_entries_at_rate_one_minus_p_and_rescales_survivors():
    theta0 = {"blocks.0.mlp.fc1.weight": torch.zeros(200, 100, dtype=F64)}
    tau = torch.randn(200, 100, generator=torch.Generator().manual_seed(0), dtype=F64)
    specialists = {"a": {"blocks.0.mlp.fc1.weight": tau}}
    for p in [0.0, 0.3, 0.9]:
        result = run("dare", theta0, specialists, {"a": heads_for("a")["a"]}, p=p, lam=1.0)
        out = result.backbone["blocks.0.mlp.fc1.weight"]
        kept = out != 0
        assert_close(out[kept], tau[kept] / (1 - p), rtol=1e-15, atol=0)  # survivors: τ/(1 − p)
        fraction = float(kept.double().mean())
        assert abs(fraction - (1 - p)) < 4 * np.sqrt(p * (1 - p) / tau.numel()) + 1e-12  # binomial, 4σ
        assert result.diagnostics["kept_fraction_dare"]["a"] == pytest.approx(fraction)


def test_dare_task_arithmetic_with_disjoint_masks_by_hand():
    # out = λ Σᵢ mᵢ τᵢ/(1 − p); with the masks read off the output of each task alone, the sum must match entrywise
    theta0 = toy_theta0()
    specialists = three(theta0)
    heads = heads_for(specialists)
    both = delta_of(run("dare", theta0, specialists, heads, p=0.4, lam=0.5), theta0)
    expected = {k: torch.zeros_like(v) for k, v in both.items()}
    for f, sd in specialists.items():
        alone = delta_of(run("dare", theta0, {f: sd}, {f: heads[f]}, p=0.4, lam=0.5), theta0)
        for k in expected:
            expected[k] += alone[k]
    assert_close(both, expected, atol=1e-6, rtol=0)


def test_dare_with_p_zero_is_task_arithmetic_or_ties():
    vit = tiny_vit()
    specialists = three(vit)
    heads = heads_for(specialists, 24)
    assert_same_backbone(
        run("dare", vit, specialists, heads, p=0.0).backbone, run("task_arithmetic", vit, specialists, heads).backbone
    )
    assert_same_backbone(
        run("dare", vit, specialists, heads, p=0.0, combine="ties", density=0.3).backbone,
        run("ties", vit, specialists, heads, density=0.3).backbone,
    )


def test_dare_is_reproducible_seeded_and_independent_of_key_order():
    vit = tiny_vit()
    specialists = three(vit)
    heads = heads_for(specialists, 24)
    for combine in dare.COMBINES:
        first = run("dare", vit, specialists, heads, combine=combine, seed=3).backbone
        again = run("dare", vit, specialists, heads, combine=combine, seed=3).backbone
        other = run("dare", vit, specialists, heads, combine=combine, seed=4).backbone
        assert_same_backbone(again, first)
        assert not torch.equal(other["blocks.0.mlp.fc1.weight"], first["blocks.0.mlp.fc1.weight"])
    # task arithmetic: a key's result depends on that key's masks only, whatever the other keys and their order
    first = run("dare", vit, specialists, heads, seed=3).backbone
    subset = [k for k in reversed(list(vit)) if "blocks.1" in k or k == "cls_token"]
    partial = run(
        "dare",
        {k: vit[k] for k in subset},
        {f: {k: sd[k] for k in subset} for f, sd in specialists.items()},
        heads,
        seed=3,
    ).backbone
    assert list(partial) == subset
    for k in subset:
        assert torch.equal(partial[k], first[k]), k


def test_dare_mask_seed_is_stable_text_not_python_hash():
    # the digest of "0\x1fdare\x1fa\x1fk" by SHA-256: a fixed number on every run (Python's hash() is salted)
    assert stable_seed(0, "dare", "a", "k") == stable_seed("0", "dare", "a", "k")
    assert stable_seed(0, "dare", "a", "k") != stable_seed(0, "dare", "b", "k")
    mask = dare.keep_mask(0, "a", "k", (1000,), 0.5)
    assert torch.equal(mask, dare.keep_mask(0, "a", "k", (1000,), 0.5))
    assert not torch.equal(mask, dare.keep_mask(0, "a", "other", (1000,), 0.5))


# ------------------------------------------------------------------------------------------------------ CART


def test_cart_by_hand_with_numpy_svd():
    d = 6  # q = max(1, ⌊0.34·6⌋) = 2 per block; fc1 (24×6) and fc2 (6×24) keep 2 too
    theta0 = toy_theta0(d=d)
    specialists = three(theta0)
    result = run("cart", theta0, specialists, heads_for(specialists, d), rank_ratio=0.34, lam=0.8, svd="exact")
    delta = delta_of(result, theta0)
    for key in theta0:
        taus = [np_tau(theta0, specialists[f], key) for f in "abc"]
        mean = sum(taus) / 3
        expected = mean.copy()
        if key in MATRIX_KEYS:
            for tau in taus:
                expected += 0.8 * np.concatenate([np_truncate(b, 2) for b in np_blocks(key, tau - mean)])
        np.testing.assert_allclose(delta[key].numpy(), expected, atol=2e-6, err_msg=key)
    assert result.diagnostics["kept_rank"] == {k: 2 for k in MATRIX_KEYS}


def test_cart_full_rank_is_averaging_and_identical_specialists_give_that_specialist():
    vit = tiny_vit()
    specialists = three(vit)
    heads = heads_for(specialists, 24)
    mean = {k: torch.stack([sd[k].double() for sd in specialists.values()]).mean(0) for k in vit}
    full = run("cart", vit, specialists, heads, rank_ratio=1.0, lam=3.0).backbone
    assert_close({k: v.double() for k, v in full.items()}, mean, atol=1e-6, rtol=0)
    specialist = specialists["a"]
    same = {f: {k: v.clone() for k, v in specialist.items()} for f in "abc"}
    for svd in cart.SVD_METHODS:
        assert_same_backbone(run("cart", vit, same, heads, svd=svd, lam=2.0).backbone, specialist)


def test_cart_exact_and_randomized_svd_agree():
    # fine-tune-like task vectors: geometrically decaying spectra. Stated tolerance: 1e-4 relative per key.
    d = 48  # q = 4; q + oversampling 16 < 48, so the randomized path runs
    theta0 = toy_theta0(d=d)
    g = torch.Generator().manual_seed(7)
    specialists = {}
    for name in "abc":
        deltas = {}
        for key in MATRIX_KEYS:
            m, n = theta0[key].shape
            x, y = torch.randn(m, 12, generator=g), torch.randn(n, 12, generator=g)
            deltas[key] = 0.01 * (x * 0.5 ** torch.arange(12.0)) @ y.T
        specialists[name] = with_deltas(theta0, deltas)
    heads = heads_for(specialists, d)
    exact = delta_of(run("cart", theta0, specialists, heads, svd="exact", lam=2.0), theta0)
    randomized = delta_of(run("cart", theta0, specialists, heads, svd="randomized", lam=2.0), theta0)
    for key in exact:
        assert (randomized[key] - exact[key]).norm().item() <= 1e-4 * exact[key].norm().item() + 1e-7, key


# ------------------------------------------------------------------------------------------------------- TSV


def np_polar(matrix: np.ndarray) -> np.ndarray:
    """A (AᵀA)^(-1/2), by an eigen-decomposition: another route to the polar factor (A of full column rank)."""
    w, v = np.linalg.eigh(matrix.T @ matrix)
    return matrix @ (v / np.sqrt(w)) @ v.T


def np_tsv(taus: list[np.ndarray]) -> np.ndarray:
    n = len(taus)
    q = max(1, min(taus[0].shape) // n)
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vt = np.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :q]), ss.append(s[:q]), vs.append(vt[:q].T)
    u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    return (np_polar(u) * s) @ np_polar(v).T


def test_tsv_by_hand_with_numpy():
    d = 6  # N = 3: q = 6 // 3 = 2 per task and block, N·q = 6 columns (a square U for the d×d blocks)
    theta0 = toy_theta0(d=d)
    specialists = three(theta0)
    result = run("tsv", theta0, specialists, heads_for(specialists, d), lam=0.6)
    delta = delta_of(result, theta0)
    for key in theta0:
        taus = [np_tau(theta0, specialists[f], key) for f in "abc"]
        if key in MATRIX_KEYS:
            blocks = [np_tsv([np_blocks(key, t)[b] for t in taus]) for b in range(len(np_blocks(key, taus[0])))]
            expected = 0.6 * np.concatenate(blocks)
        else:
            expected = 0.6 * sum(taus) / 3
        np.testing.assert_allclose(delta[key].numpy(), expected, atol=3e-6, err_msg=key)
    assert result.diagnostics["kept_rank"] == {k: 2 for k in MATRIX_KEYS}


def test_tsv_of_orthogonal_task_vectors_is_their_sum_and_one_task_is_itself():
    # τ₁ = diag(3, 2, 0, 0), τ₂ = diag(0, 0, 5, 1): q = 2, the singular vectors are already orthogonal
    theta0 = {"blocks.0.attn.proj.weight": torch.zeros(4, 4), "norm.bias": torch.zeros(4)}
    specialists = {
        "a": {"blocks.0.attn.proj.weight": torch.diag(torch.tensor([3.0, 2, 0, 0])), "norm.bias": torch.ones(4)},
        "b": {"blocks.0.attn.proj.weight": torch.diag(torch.tensor([0.0, 0, 5, 1])), "norm.bias": torch.zeros(4)},
    }
    out = run("tsv", theta0, specialists, heads_for("ab")).backbone
    assert_close(out["blocks.0.attn.proj.weight"], torch.diag(torch.tensor([3.0, 2, 5, 1])), atol=1e-6, rtol=0)
    assert_close(out["norm.bias"], torch.full((4,), 0.5))
    vit = tiny_vit()
    one = {"a": perturbed(vit, 1)}  # N = 1: full rank, U and V already orthonormal
    assert_close(run("tsv", vit, one, heads_for("a", 24)).backbone, one["a"], atol=1e-6, rtol=0)


def test_tsv_randomized_truncation_matches_exact_where_the_top_q_stands_out():
    # 96×96 task vectors with a decaying spectrum σⱼ = 0.8^j: q = 32 per task, and the sketch's 16 extra columns and
    # 2 power iterations then find the same top-32 subspace as the exact SVD (σ₄₈/σ₃₂ ≈ 0.03), up to the float32
    # rounding both truncations share, which the polar factor of the square U = [U_a U_b U_c] amplifies
    torch.manual_seed(0)
    d = 96
    theta0 = {"blocks.0.attn.proj.weight": torch.zeros(d, d), "norm.bias": torch.zeros(d)}

    def decaying() -> Tensor:
        u, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        return ((u * 0.8 ** torch.arange(d, dtype=torch.float64)) @ v.T).float()

    specialists = {f: {"blocks.0.attn.proj.weight": decaying(), "norm.bias": torch.randn(d)} for f in "abc"}
    heads = heads_for("abc", d)
    exact = run("tsv", theta0, specialists, heads, svd="exact")
    randomized = run("tsv", theta0, specialists, heads, svd="randomized")
    key = "blocks.0.attn.proj.weight"
    difference = (randomized.backbone[key] - exact.backbone[key]).norm() / exact.backbone[key].norm()
    assert difference < 1e-3, difference  # float32 truncations either way; measured 1.0e-4
    assert_close(randomized.backbone["norm.bias"], exact.backbone["norm.bias"], atol=0, rtol=0)  # τ̄ either way
    assert randomized.diagnostics["hyperparameters"]["svd"] == "randomized"
    assert randomized.diagnostics["kept_rank"] == exact.diagnostics["kept_rank"] == {key: 32}
    # and the sketch really is another computation: on a flat spectrum it keeps other directions
    flat = {f: {"blocks.0.attn.proj.weight": torch.randn(d, d), "norm.bias": torch.zeros(d)} for f in "abc"}
    flat_exact = run("tsv", theta0, flat, heads).backbone[key]
    apart = run("tsv", theta0, flat, heads, svd="randomized").backbone[key] - flat_exact
    assert apart.norm() > 1e-2 * flat_exact.norm()


# ----------------------------------------------------------------------------------------------------- Iso-C


def test_iso_c_by_hand():
    # τ₁ = diag(2, 0), τ₂ = diag(1, 1): Σ = diag(3, 1), σ̄ = 2, σ̄ U Vᵀ = 2·I; λ = 1.5 on both key kinds
    theta0 = {"blocks.0.attn.proj.weight": torch.zeros(2, 2), "norm.bias": torch.zeros(2)}
    specialists = {
        "a": {"blocks.0.attn.proj.weight": torch.diag(torch.tensor([2.0, 0.0])), "norm.bias": torch.tensor([1.0, 0])},
        "b": {"blocks.0.attn.proj.weight": torch.eye(2), "norm.bias": torch.tensor([0.0, 3])},
    }
    out = run("iso_c", theta0, specialists, heads_for("ab", 2), lam=1.5).backbone
    assert_close(out["blocks.0.attn.proj.weight"], 3.0 * torch.eye(2), atol=1e-7, rtol=0)
    assert_close(out["norm.bias"], 1.5 * torch.tensor([0.5, 1.5]))


def test_iso_c_with_numpy_svd():
    d = 6
    theta0 = toy_theta0(d=d)
    specialists = three(theta0)
    delta = delta_of(run("iso_c", theta0, specialists, heads_for(specialists, d), lam=0.9), theta0)
    for key in theta0:
        total = sum(np_tau(theta0, specialists[f], key) for f in "abc")
        if key in MATRIX_KEYS:
            blocks = []
            for block in np_blocks(key, total):
                u, s, vt = np.linalg.svd(block, full_matrices=False)
                blocks.append(s.mean() * u @ vt)
            expected = 0.9 * np.concatenate(blocks)
        else:
            expected = 0.9 * total / 3
        np.testing.assert_allclose(delta[key].numpy(), expected, atol=1e-6, err_msg=key)


def test_iso_c_one_specialist_with_a_flat_spectrum_gives_that_specialist():
    # Iso-C flattens every spectrum, so it returns a specialist only when its matrices already have a flat one:
    # τ = c·orthogonal on each matrix (each d×d block of qkv), anything on the other keys. N identical copies give
    # N·τ on the matrices (the official code's sum) and τ elsewhere.
    d = 8
    theta0 = toy_theta0(d=d)
    g = torch.Generator().manual_seed(3)
    deltas = perturbed(theta0, 1)
    deltas = {k: deltas[k] - theta0[k] for k in theta0}
    for key in MATRIX_KEYS:
        rows, cols = theta0[key].shape
        blocks = 3 if key.endswith("qkv.weight") else 1
        tall, wide = max(rows // blocks, cols), min(rows // blocks, cols)
        # orthonormal columns (tall) or rows (wide): every singular value is 1
        orthogonal = [torch.linalg.qr(torch.randn(tall, wide, generator=g))[0] for _ in range(blocks)]
        orthogonal = [o if rows // blocks >= cols else o.T for o in orthogonal]
        deltas[key] = 0.03 * torch.cat(orthogonal)
    specialist = with_deltas(theta0, deltas)
    assert_close(run("iso_c", theta0, {"a": specialist}, heads_for("a", d)).backbone, specialist, atol=1e-6, rtol=0)
    same = {f: {k: v.clone() for k, v in specialist.items()} for f in "abc"}
    tripled = with_deltas(theta0, {k: (3 if k in MATRIX_KEYS else 1) * deltas[k] for k in theta0})
    assert_close(run("iso_c", theta0, same, heads_for("abc", d)).backbone, tripled, atol=1e-6, rtol=0)
    # a non-flat spectrum is flattened: not the specialist
    skewed = perturbed(theta0, 2)
    out = run("iso_c", theta0, {f: skewed for f in "abc"}, heads_for("abc", d)).backbone
    assert not torch.allclose(out["blocks.0.mlp.fc1.weight"], skewed["blocks.0.mlp.fc1.weight"], atol=1e-4)


# ------------------------------------------------------------------------------------------------ invariants


# Every merger in conf/merger/ with its defaults ({}), plus the knob settings that take another code path.
OTHER_SETTINGS = {
    "ties": [{"trim_scope": "per_tensor", "merge_fn": "sum"}],
    "dare": [{"combine": "ties", "p": 0.3}],
    "cart": [{"svd": "exact", "rank_ratio": 0.5}],
    "r2m": [{"k": 2, "center": True, "eta_mode": "relative"}],
    "tsv": [{"svd": "randomized"}],
}
SETTINGS = {name: [{}, *OTHER_SETTINGS.get(name, [])] for name in merger_names()}
CASES = [(name, kwargs) for name, options in SETTINGS.items() for kwargs in options]
CASE_IDS = [f"{name}-{'-'.join(map(str, kwargs.values())) or 'default'}" for name, kwargs in CASES]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_output_has_theta0_keys_shapes_dtypes_and_zero_tasks_give_theta0(name, kwargs):
    narrow = {"pos_embed": torch.bfloat16, "blocks.0.mlp.fc2.weight": torch.float16}
    narrow |= {"blocks.0.norm2.bias": torch.float16, "blocks.0.attn.qkv.weight": torch.bfloat16}
    mixed = toy_theta0(dtypes=narrow)
    mixed["step"] = torch.tensor(7)  # a non-floating buffer is carried over
    specialists = three(mixed)
    for sd in specialists.values():
        sd["step"] = torch.tensor(7)
    result = run(name, mixed, specialists, heads_for(specialists), **kwargs)
    assert list(result.backbone) == list(mixed)
    for key, value in mixed.items():
        assert result.backbone[key].shape == value.shape and result.backbone[key].dtype == value.dtype, key
        assert torch.isfinite(result.backbone[key].float()).all(), key
    assert not torch.equal(result.backbone["blocks.0.mlp.fc1.weight"], mixed["blocks.0.mlp.fc1.weight"])
    json.dumps(result.diagnostics, allow_nan=False)
    # zero task vectors: θ₀ bit for bit, no NaN anywhere
    zero = {f: {k: v.clone() for k, v in mixed.items()} for f in "abc"}
    result = run(name, mixed, zero, heads_for(zero), **kwargs)
    assert_same_backbone(result.backbone, mixed)
    json.dumps(result.diagnostics, allow_nan=False)


@pytest.mark.parametrize("name", ["ties", "dare", "tsv", "iso_c"])
def test_lambda_zero_gives_theta0(name):
    theta0 = toy_theta0()
    specialists = three(theta0)
    for kwargs in SETTINGS[name]:
        result = run(name, theta0, specialists, heads_for(specialists), lam=0.0, **kwargs)
        assert_same_backbone(result.backbone, theta0)


def test_cart_lambda_zero_is_weight_averaging():
    theta0 = toy_theta0()
    specialists = three(theta0)
    out = run("cart", theta0, specialists, heads_for(specialists), lam=0.0).backbone
    mean = {k: torch.stack([sd[k].double() for sd in specialists.values()]).mean(0).float() for k in theta0}
    assert_same_backbone(out, mean)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_task_order_does_not_matter(name, kwargs):
    theta0 = toy_theta0(d=6)
    models = [perturbed(theta0, s) for s in (1, 2, 3)]
    head_list = list(heads_for("abc", 6).values())
    results = []
    for order in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:
        if name in FAMILY_SEEDED:  # masks are seeded by family name: permute the mapping's order, not the names
            specialists = {"abc"[j]: models[j] for j in order}
            heads = {"abc"[j]: head_list[j] for j in order}
        else:  # the same models under other family names
            specialists = {"abc"[i]: models[j] for i, j in enumerate(order)}
            heads = {"abc"[i]: head_list[j] for i, j in enumerate(order)}
        results.append(run(name, theta0, specialists, heads, **kwargs))
    for other in results[1:]:
        assert_close(other.backbone, results[0].backbone, atol=1e-6, rtol=1e-5)
        assert_close(other.head, results[0].head)


@pytest.mark.parametrize(("name", "kwargs"), [("cart", {"svd": "exact"}), ("cart", {}), ("tsv", {}), ("iso_c", {})])
def test_fused_qkv_equals_split_q_k_v(name, kwargs):
    d = 24  # CART: q = ⌊0.1·24⌋ = 2 per d×d block; a whole-matrix truncation of the fused 72×24 would differ
    fused = toy_theta0(d=d)
    specialists = three(fused)
    heads = heads_for(specialists, d)
    a = run(name, fused, specialists, heads, **kwargs)
    b = run(name, split_state(fused), {f: split_state(sd) for f, sd in specialists.items()}, heads, **kwargs)
    assert_close(split_state(a.backbone), b.backbone, atol=1e-6, rtol=1e-5)
    whole = {"cart": 2, "tsv": 8, "iso_c": 24}[name]  # per block: ⌊0.1·24⌋, 24 // 3, all 24
    assert a.diagnostics["kept_rank"]["blocks.0.attn.qkv.weight"] == whole


# ------------------------------------------------------------------------------------------ real ViT, on disk


def test_every_merger_on_a_tiny_vit_through_safetensors_files(tmp_path):
    vit = tiny_vit()
    vit = {k: (v.to(torch.bfloat16) if k == "pos_embed" else v) for k, v in vit.items()}  # one narrow key
    eager = three(vit, scale=0.02)
    heads = heads_for(eager, 24)
    for f, sd in eager.items():
        save_detector(tmp_path / f"{f}.safetensors", sd, heads[f], {"kind": "specialist"})
    for name, options in SETTINGS.items():
        for kwargs in options:
            reads = {f: Counter() for f in eager}
            counted = {
                f: LazyStateDict(FileStateDict(tmp_path / f"{f}.safetensors"), reads[f]) for f in eager
            }  # lazy over the files, counting reads per key
            result = run(name, vit, counted, heads, **kwargs)
            assert list(result.backbone) == list(vit)
            for key, value in vit.items():
                out = result.backbone[key]
                assert out.shape == value.shape and out.dtype == value.dtype, (name, key)
                assert torch.isfinite(out.float()).all(), (name, key)
            assert_close(result.backbone, run(name, vit, eager, heads, **kwargs).backbone, atol=0, rtol=0)
            global_ties = kwargs.get("trim_scope", "global") == "global" and kwargs.get("combine") == "ties"
            passes = 3 if global_ties else PASSES.get(name, 1)
            if name == "ties" and kwargs.get("trim_scope") == "per_tensor":
                passes = 1
            for f in eager:
                assert max(reads[f].values()) == passes, (name, kwargs, f)  # one key at a time, `passes` times
            json.dumps(result.diagnostics, allow_nan=False)


def test_diagnostics_hold_the_method_specific_facts():
    vit = tiny_vit()
    specialists = three(vit)
    heads = heads_for(specialists, 24)
    common = {"merger", "families", "hyperparameters", "task_vector_norms", "task_vector_cosines", "timings_s"}
    facts = {
        "ties": {"thresholds", "kept_fraction", "sign_conflict_fraction", "k"},
        "dare": {"kept_fraction_dare"},
        "cart": {"kept_rank"},
        "tsv": {"kept_rank"},
        "iso_c": {"kept_rank", "mean_singular_value"},
    }
    for name in merger_names():
        diagnostics = json.loads(json.dumps(run(name, vit, specialists, heads).diagnostics, allow_nan=False))
        assert diagnostics["merger"] == name
        assert set(diagnostics) >= common | facts.get(name, set()), name
        assert "total" in diagnostics["timings_s"]
    ties_facts = run("ties", vit, specialists, heads).diagnostics
    assert 0 < ties_facts["sign_conflict_fraction"] < 1
    for f in "abc":
        assert ties_facts["kept_fraction"][f] == pytest.approx(0.2, abs=1e-3)  # continuous values: no ties
    kept = run("dare", vit, specialists, heads).diagnostics["kept_fraction_dare"]
    assert all(abs(v - 0.5) < 0.02 for v in kept.values())


# ------------------------------------------------------------------------------------------------ refusals


class Untouchable(Mapping):
    """A state dict that fails the test if it is read: knob checks must come before any work."""

    def __getitem__(self, key):
        raise AssertionError("read before the knobs were checked")

    def __iter__(self):
        raise AssertionError("read before the knobs were checked")

    def __len__(self):
        raise AssertionError("read before the knobs were checked")


BAD_KNOBS = [
    ("ties", {"density": 0.0}, "density"),
    ("ties", {"density": 20}, "density"),
    ("ties", {"density": 1.5}, "density"),
    ("ties", {"density": float("nan")}, "density"),
    ("ties", {"lam": float("inf")}, "lam"),
    ("ties", {"lam": True}, "lam"),
    ("ties", {"trim_scope": "per_layer"}, "trim_scope"),
    ("ties", {"merge_fn": "mean"}, "merge_fn"),
    ("dare", {"p": 1.0}, "p "),
    ("dare", {"p": -0.1}, "p "),
    ("dare", {"lam": float("nan")}, "lam"),
    ("dare", {"combine": "average"}, "combine"),
    ("dare", {"seed": 1.5}, "seed"),
    ("dare", {"density": 0}, "density"),
    ("cart", {"rank_ratio": 0.0}, "rank_ratio"),
    ("cart", {"rank_ratio": 10}, "rank_ratio"),
    ("cart", {"svd": "lanczos"}, "svd"),
    ("cart", {"lam": float("-inf")}, "lam"),
    ("tsv", {"lam": float("nan")}, "lam"),
    ("tsv", {"svd": "lanczos"}, "svd"),
    ("iso_c", {"lam": "1"}, "lam"),
]


@pytest.mark.parametrize(("name", "knobs", "match"), BAD_KNOBS)
def test_bad_knobs_are_refused_before_any_work(name, knobs, match):
    with pytest.raises(ValueError, match=match):
        load_merger(name, **knobs)  # refused when the merger is built from its config, before any call
    with pytest.raises(ValueError, match=match):
        run(name, Untouchable(), {"a": Untouchable()}, {}, **knobs)


@pytest.mark.parametrize("name", merger_names())
def test_incompatible_specialists_are_refused_by_name(name):
    theta0, good, cases = broken_cases()
    for bad, words in cases:
        with pytest.raises(ValueError) as error:
            run(name, theta0, {"good": good, "bad": bad}, heads_for(["good", "bad"]))
        for word in [*words, "bad"]:
            assert word in str(error.value), (name, word, str(error.value))
