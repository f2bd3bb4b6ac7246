"""Mergers against hand-computed answers and the invariants of shared/design/merging.md."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping

import pytest
import timm
import torch
from torch import Tensor
from torch.testing import assert_close

from r2m_lab.mergers import MergeResult, load_merger, merger_names, r2m, task_vectors
from r2m_lab.mergers.task_vectors import (
    average_heads,
    check_compatible,
    fuse_qkv,
    is_matrix_key,
    is_norm_or_bias,
    kept_rank,
    low_rank_factors,
    polar_factor,
    split_qkv,
    task_vector_cosines,
    task_vector_norms,
)

torch.set_num_threads(1)

F64 = torch.float64
MERGERS = merger_names()  # every merger in conf/merger/: the invariant tests below run on each
# Reads per key of a lazy specialist: one streaming pass unless a merger needs more (a new merger defaults to 1).
PASSES = {"r2m": 3, "ties": 3}
# a key no specialist changed: TIES' sample (a few runs of it), its threshold pass and its merge pass each open it
FROZEN_READS = {"ties": 3}
FAMILY_SEEDED = {"dare"}  # random draws seeded by family name: renaming the families changes the merge on purpose


def run(name: str, theta0: Mapping[str, Tensor], specialists, heads, **knobs) -> MergeResult:
    """Merge with ``conf/merger/<name>.yaml``'s defaults and ``knobs`` overriding them (checked at construction)."""
    return load_merger(name, **knobs)(theta0, specialists, heads)


# ------------------------------------------------------------------------------------------------------ builders


def toy_theta0(d: int = 4, seed: int = 0, dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, Tensor]:
    """A one-block timm-ViT-like state dict (embed dim d, MLP 4d)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 5, d),
        "patch_embed.proj.weight": (d, 3, 2, 2),
        "patch_embed.proj.bias": (d,),
        "blocks.0.norm1.weight": (d,),
        "blocks.0.norm1.bias": (d,),
        "blocks.0.attn.qkv.weight": (3 * d, d),
        "blocks.0.attn.qkv.bias": (3 * d,),
        "blocks.0.attn.proj.weight": (d, d),
        "blocks.0.attn.proj.bias": (d,),
        "blocks.0.norm2.weight": (d,),
        "blocks.0.norm2.bias": (d,),
        "blocks.0.mlp.fc1.weight": (4 * d, d),
        "blocks.0.mlp.fc1.bias": (4 * d,),
        "blocks.0.mlp.fc2.weight": (d, 4 * d),
        "blocks.0.mlp.fc2.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    dtypes = dtypes or {}
    return {k: torch.randn(s, generator=g).to(dtypes.get(k, torch.float32)) for k, s in shapes.items()}


def tiny_vit() -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=24,
        depth=2,
        num_heads=2,
        num_classes=0,
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturbed(theta0: Mapping[str, Tensor], seed: int, scale: float = 0.05) -> dict[str, Tensor]:
    """θ₀ + scale·(shared direction + own noise): task vectors with a clear common component, like fine-tunes."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(12345)
    out = {}
    for k, v in theta0.items():
        delta = torch.randn(v.shape, generator=shared) + 0.7 * torch.randn(v.shape, generator=g)
        out[k] = (v.to(F64) + scale * delta).to(v.dtype)
    return out


def with_deltas(theta0: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A specialist equal to θ₀ except on the given keys (θ₀ + δ)."""
    out = {k: v.clone() for k, v in theta0.items()}
    for k, d in deltas.items():
        out[k] = (theta0[k].to(F64) + d.to(F64)).to(theta0[k].dtype)
    return out


def heads_for(names, dim: int = 4, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {n: {"weight": torch.randn(2, dim, generator=g), "bias": torch.randn(2, generator=g)} for n in names}


def delta_of(result: MergeResult, theta0: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: result.backbone[k].to(F64) - theta0[k].to(F64) for k in theta0}


def assert_same_backbone(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        assert torch.equal(actual[k], expected[k]), k


def orthonormal_matrices(count: int, shape: tuple[int, int], seed: int = 0) -> list[Tensor]:
    """`count` matrices orthonormal under the Frobenius inner product."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(shape[0] * shape[1], count, generator=g, dtype=F64))
    return [q[:, j].reshape(shape) for j in range(count)]


class LazyStateDict(Mapping):
    """Loads (clones) one tensor per access and counts accesses, like a safetensors-backed specialist."""

    def __init__(self, tensors: Mapping[str, Tensor], reads: Counter):
        self._tensors, self._reads = tensors, reads

    def __getitem__(self, key: str) -> Tensor:
        self._reads[key] += 1
        return self._tensors[key].clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class Untouchable(Mapping):
    """A state dict that must not be looked at (knob validation comes before any work)."""

    def __getitem__(self, key):
        raise AssertionError("tensor read before the hyper-parameters were validated")

    def __iter__(self):
        raise AssertionError("keys read before the hyper-parameters were validated")

    def __len__(self):
        return 3


# ------------------------------------------------------------------------------------------------------ helpers


def test_key_classes_follow_timm_names():
    for key in [
        "blocks.0.attn.qkv.weight",
        "blocks.11.attn.proj.weight",
        "blocks.3.mlp.fc1.weight",
        "blocks.3.mlp.fc2.weight",
        "blocks.0.attn.q.weight",
        "visual.blocks.2.mlp.fc1.weight",
    ]:
        assert is_matrix_key(key), key
    for key in [
        "blocks.0.attn.qkv.bias",
        "blocks.0.norm1.weight",
        "patch_embed.proj.weight",
        "pos_embed",
        "cls_token",
        "head.weight",
        "blocks.0.mlp.fc1.bias",
        "blocks.0.attn.proj.weightx",
    ]:
        assert not is_matrix_key(key), key
    for key in [
        "blocks.0.attn.qkv.bias",
        "blocks.0.norm1.weight",
        "norm.weight",
        "fc_norm.bias",
        "norm_pre.weight",
        "blocks.0.attn.q_norm.weight",
        "patch_embed.proj.bias",
        "blocks.0.attn.q_bias",
    ]:
        assert is_norm_or_bias(key), key
    for key in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma"]:
        assert not is_norm_or_bias(key), key


def test_split_and_fuse_qkv_are_inverse_row_blocks():
    w = torch.arange(36.0).reshape(12, 3)
    blocks = split_qkv(w)
    assert blocks.shape == (3, 4, 3)
    assert torch.equal(blocks[1], w[4:8])  # k = rows d..2d
    assert torch.equal(fuse_qkv(blocks), w)
    assert torch.equal(fuse_qkv([w[:4], w[4:8], w[8:]]), w)
    with pytest.raises(ValueError, match="divisible by 3"):
        split_qkv(torch.zeros(10, 3))


def test_kept_rank_floors_a_fraction_and_keeps_at_least_one():
    assert kept_rank(768, 768, 0.1) == 76
    assert kept_rank(3072, 768, 0.1) == 76
    assert kept_rank(100, 100, 0.29) == 29  # 0.29·100 = 28.999999999999996 in floating point
    assert kept_rank(24, 24, 0.01) == 1
    assert kept_rank(24, 96, 1.0) == 24


def test_low_rank_factors_recover_a_known_svd_exactly_and_randomized():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    s = 5.0 * 0.6 ** torch.arange(40.0)
    a = (u * s) @ v.T
    expected = (u[:, :2] * s[:2]) @ v[:, :2].T
    for method in ["exact", "randomized"]:  # q + oversampling = 18 < 40: the randomized path really runs
        us, vh = low_rank_factors(a, 2, method)
        assert us.shape == (64, 2) and vh.shape == (2, 40)
        assert_close(us @ vh, expected, atol=1e-5, rtol=1e-5)


def test_randomized_svd_is_near_optimal_on_a_flat_spectrum_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(96, 64, generator=g)  # flat spectrum: the hardest case for a sketch
    state = torch.get_rng_state()
    us, vh = low_rank_factors(a, 6, "randomized")
    assert torch.equal(torch.get_rng_state(), state)
    us_exact, vh_exact = low_rank_factors(a, 6, "exact")
    error, optimal = (a - us @ vh).norm(), (a - us_exact @ vh_exact).norm()
    assert optimal <= error <= 1.001 * optimal  # within 0.1 % of the best rank-6 error
    again = low_rank_factors(a, 6, "randomized")
    assert torch.equal(again[0] @ again[1], us @ vh)  # seeded: deterministic


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_randomized_svd_of_zero_and_rank_deficient_matrices_is_exact(dtype):
    # rank 3 < q + oversampling: the range finder's products are singular (a LoRA-like or a zero residual)
    g = torch.Generator().manual_seed(2)
    low = (torch.randn(200, 3, generator=g, dtype=F64) @ torch.randn(3, 120, generator=g, dtype=F64)).to(dtype)
    for a in (low, low.mT, torch.zeros(200, 120, dtype=dtype)):
        us, vh = low_rank_factors(a, 10, "randomized")
        assert torch.isfinite(us).all() and torch.isfinite(vh).all()
        assert (us @ vh - a).norm() <= (1e-5 if dtype == torch.float32 else 1e-12) * max(float(a.norm()), 1.0)


def decaying_matrix(rows: int, cols: int, ratio: float, seed: int) -> Tensor:
    """A float64 (rows, cols) matrix with singular values ratioʲ (j = 0, 1, ...) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    rank = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=F64))
    return (u * ratio ** torch.arange(rank, dtype=F64)) @ v.T


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])  # tall, and wide (the range finder works on the transpose)
def test_randomized_svd_of_float64_input_is_float64_accurate_and_deterministic(shape):
    a = decaying_matrix(*shape, ratio=0.85, seed=3)  # q = 10, q + oversampling = 26 < 120: the randomized path runs
    us, vh = low_rank_factors(a, 10, "randomized")
    assert us.dtype == vh.dtype == F64 and us.shape == (shape[0], 10) and vh.shape == (10, shape[1])
    us_exact, vh_exact = low_rank_factors(a, 10, "exact")
    exact = us_exact @ vh_exact
    # float32 range finder (2 power iterations) + float64 finish: measured 4.8e-9 (tall) and 1.6e-8 (wide) here, the
    # method's own convergence error at 2 iterations (6 iterations gave 2e-11 at 2.3× the time). The same method all
    # in float32 stays 6.6e-7 and 9.6e-7 off.
    assert (us @ vh - exact).norm() <= 5e-8 * exact.norm()
    us32, vh32 = low_rank_factors(a.to(torch.float32), 10, "randomized")
    assert (us32.to(F64) @ vh32.to(F64) - exact).norm() >= 3e-7 * exact.norm()  # so the bound above is not trivial
    # seeded per matrix: the same bits on a second call and inside a batch, whatever the neighbours
    again = low_rank_factors(a, 10, "randomized")
    batched = low_rank_factors(torch.stack([decaying_matrix(*shape, ratio=0.5, seed=4), a]), 10, "randomized")
    for factor, repeat, in_batch in zip((us, vh), again, batched, strict=True):
        assert torch.equal(repeat, factor) and torch.equal(in_batch[1], factor)


def with_spectrum(rows: int, cols: int, sigma: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(A, U, V) float64 with A = U diag(sigma) Vᵀ for random orthonormal U (rows, r), V (cols, r), r = len(sigma)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(sigma), generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(sigma), generator=g, dtype=F64))
    return (u * sigma) @ v.T, u, v


@pytest.mark.parametrize("shape", [(90, 60), (60, 90), (64, 64)])  # tall (AᵀA), wide (AAᵀ), square
def test_polar_factor_by_the_gram_matches_the_known_one_and_the_svd(shape):
    rank = min(shape)
    sigma = torch.logspace(0, -3.5, rank, dtype=F64)  # κ ≈ 3e3, inside the Gram route's bound of 1e5
    a, u, v = with_spectrum(*shape, sigma, seed=5)
    polar, s = polar_factor(a, "gram")
    # eps·κ² ≈ 1e-9 is the Gram route's error bound; measured ~1e-12 here
    assert (polar - u @ v.T).norm() <= 1e-9 * math.sqrt(rank) and (s - sigma).abs().max() <= 1e-12
    polar_svd, s_svd = polar_factor(a, "svd")
    assert (polar - polar_svd).norm() <= 1e-9 * math.sqrt(rank) and torch.allclose(s, s_svd, rtol=0, atol=1e-12)
    assert polar.dtype == a.dtype == s.dtype and polar.shape == a.shape and s.shape == (rank,)
    batch = torch.stack([a, 2 * a])  # batched: each matrix on its own
    polar_b, s_b = polar_factor(batch, "gram")
    assert_close(polar_b[1], polar, rtol=0, atol=1e-9)
    assert_close(s_b[1], 2 * s, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="polar must be one of gram, svd"):
        polar_factor(a, "qr")


def test_polar_factor_by_the_gram_hands_ill_conditioned_and_zero_matrices_to_the_svd():
    # κ = 1e6 > 1e5: squared (1e12) the Gram loses ~eps·κ² = 1e-4 of the smallest directions, so the SVD decides;
    # rank deficient and zero matrices too, where U Vᵀ is the SVD's choice. A well-conditioned neighbour in the same
    # batch keeps the Gram route and the same result.
    sigma = torch.logspace(0, -6, 40, dtype=F64)
    ill, u, v = with_spectrum(70, 40, sigma, seed=6)
    deficient = with_spectrum(70, 40, torch.cat([torch.ones(30, dtype=F64), torch.zeros(10, dtype=F64)]), seed=7)[0]
    good = with_spectrum(70, 40, torch.linspace(1, 0.5, 40, dtype=F64), seed=8)[0]
    batch = torch.stack([ill, deficient, torch.zeros(70, 40, dtype=F64), good])
    polar, s = polar_factor(batch, "gram")
    polar_svd, s_svd = polar_factor(batch, "svd")
    assert torch.equal(polar[:3], polar_svd[:3]) and torch.equal(s[:3], s_svd[:3])  # the SVD's bits
    assert (polar[0] - u @ v.T).norm() <= 1e-6
    assert_close(polar[3], polar_svd[3], rtol=0, atol=1e-12)


def test_iso_c_and_tsv_polar_by_gram_agree_with_the_svd():
    d = 24
    theta0 = toy_theta0(d=d, seed=9, dtypes=dict.fromkeys(toy_theta0(d=d), F64))
    specialists = {f: perturbed(theta0, i) for i, f in enumerate("abc")}
    heads = heads_for("abc", d)
    for name in ("iso_c", "tsv"):
        by_gram = run(name, theta0, specialists, heads, polar="gram")
        by_svd = run(name, theta0, specialists, heads, polar="svd")
        assert by_gram.diagnostics["hyperparameters"]["polar"] == "gram"
        for key in theta0:
            delta = by_svd.backbone[key] - theta0[key]
            error = (by_gram.backbone[key] - by_svd.backbone[key]).norm()
            assert error <= 1e-9 * delta.norm() + 1e-15, (name, key)


def test_elementwise_merge_in_chunks_is_the_whole_key_merge_bit_for_bit(monkeypatch):
    # chunks of 7 entries: every key but the smallest spans several chunks, the last one partial
    monkeypatch.setattr(task_vectors, "ELEMENTWISE_CHUNK", 7)
    theta0 = toy_theta0(d=6, dtypes={"blocks.0.mlp.fc1.weight": F64, "pos_embed": F64})  # float64 keys too
    pristine = {k: v.clone() for k, v in theta0.items()}
    specialists = {f: perturbed(theta0, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}
    for sd in specialists.values():
        sd["blocks.0.norm1.weight"] = theta0["blocks.0.norm1.weight"].clone()  # a key no specialist changed
    heads = heads_for(specialists, 6)
    for combine in (lambda _key, taus: taus.mean(0), lambda _key, taus: 0.3 * taus.sum(0)):
        chunked = task_vectors.merge_key_by_key(theta0, specialists, heads, "x", combine, elementwise=True)
        whole = task_vectors.merge_key_by_key(theta0, specialists, heads, "x", combine)
        assert_same_backbone(chunked.backbone, whole.backbone)
        assert chunked.diagnostics["n_zero_keys"] == whole.diagnostics["n_zero_keys"] == 1
        norms = chunked.diagnostics["task_vector_norms"]
        assert norms == pytest.approx(whole.diagnostics["task_vector_norms"], rel=1e-12)
        assert_close(
            torch.tensor(chunked.diagnostics["task_vector_cosines"]),
            torch.tensor(whole.diagnostics["task_vector_cosines"]),
            rtol=0,
            atol=1e-12,
        )
    assert_same_backbone(theta0, pristine)  # θ₀ is read, never written (a float64 θ₀ chunk is not a scratch buffer)
    broken = dict(specialists["b"])
    broken["blocks.0.mlp.fc1.weight"] = broken["blocks.0.mlp.fc1.weight"].clone()
    broken["blocks.0.mlp.fc1.weight"][5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"specialist 'b': key 'blocks.0.mlp.fc1.weight' has 1 non-finite"):
        run("average", theta0, {**specialists, "b": broken}, heads)


def test_task_vector_norms_and_cosines_by_hand():
    theta0 = {"cls_token": torch.zeros(1, 1, 3), "norm.weight": torch.ones(2)}
    specialists = {
        "b": with_deltas(theta0, {"cls_token": torch.tensor([[[2.0, 0, 0]]])}),
        "a": with_deltas(theta0, {"cls_token": torch.tensor([[[1.0, 0, 0]]])}),
        "c": with_deltas(theta0, {"cls_token": torch.tensor([[[0, 0, 3.0]]]), "norm.weight": torch.tensor([4.0, 0])}),
        "z": with_deltas(theta0, {}),
    }
    assert task_vector_norms(theta0, specialists) == pytest.approx({"a": 1.0, "b": 2.0, "c": 5.0, "z": 0.0})
    names, cosines = task_vector_cosines(theta0, specialists)
    assert names == ["a", "b", "c", "z"]
    assert_close(
        torch.tensor(cosines, dtype=F64),
        torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0]], dtype=F64),
    )


def test_heads_are_averaged_by_every_merger():
    theta0 = toy_theta0()
    specialists = {"x": perturbed(theta0, 1), "y": perturbed(theta0, 2)}
    heads = {
        "x": {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "bias": torch.tensor([0.0, 1.0])},
        "y": {"weight": torch.tensor([[3.0, 0.0], [-1.0, 4.0]]), "bias": torch.tensor([2.0, -3.0])},
    }
    expected = {"weight": torch.tensor([[2.0, 1.0], [1.0, 4.0]]), "bias": torch.tensor([1.0, -1.0])}
    assert_close(average_heads(heads), expected)
    for name in MERGERS:
        assert_close(run(name, theta0, specialists, heads).head, expected, msg=name)


# --------------------------------------------------------------------------------------- average and task arithmetic


def hand_case():
    """Two specialists on a 2×2 fc1 (float32) and a bfloat16 bias; every value exact in its dtype."""
    theta0 = {
        "blocks.0.mlp.fc1.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "blocks.0.mlp.fc1.bias": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
        "norm.weight": torch.tensor([1.0, 1.0]),
    }
    a = {
        "blocks.0.mlp.fc1.weight": torch.tensor([[2.0, 2.0], [3.0, 5.0]]),
        "blocks.0.mlp.fc1.bias": torch.tensor([1.5, 2.0], dtype=torch.bfloat16),
        "norm.weight": torch.ones(2),
    }
    b = {
        "blocks.0.mlp.fc1.weight": torch.tensor([[4.0, 2.0], [5.0, 3.0]]),
        "blocks.0.mlp.fc1.bias": torch.tensor([2.0, 3.0], dtype=torch.bfloat16),
        "norm.weight": torch.ones(2),
    }
    return theta0, {"a": a, "b": b}, heads_for("ab", dim=2)


def test_average_by_hand():
    theta0, specialists, heads = hand_case()
    out = run("average", theta0, specialists, heads).backbone
    # τ_a = [[1,0],[0,1]], τ_b = [[3,0],[2,-1]] -> τ̄ = [[2,0],[1,0]]; bias τ̄ = [0.75, 0.5]
    assert torch.equal(out["blocks.0.mlp.fc1.weight"], torch.tensor([[3.0, 2.0], [4.0, 4.0]]))
    assert torch.equal(out["blocks.0.mlp.fc1.bias"], torch.tensor([1.75, 2.5], dtype=torch.bfloat16))
    assert torch.equal(out["norm.weight"], theta0["norm.weight"])


def test_task_arithmetic_by_hand_and_lambda_zero_is_theta0():
    theta0, specialists, heads = hand_case()
    out = run("task_arithmetic", theta0, specialists, heads, lam=0.25).backbone
    # λ Σ τ = 0.25·[[4,0],[2,0]] = [[1,0],[0.5,0]]; bias 0.25·[1.5, 1] = [0.375, 0.25]
    assert torch.equal(out["blocks.0.mlp.fc1.weight"], torch.tensor([[2.0, 2.0], [3.5, 4.0]]))
    assert torch.equal(out["blocks.0.mlp.fc1.bias"], torch.tensor([1.375, 2.25], dtype=torch.bfloat16))
    default = run("task_arithmetic", theta0, specialists, heads).backbone  # λ = 0.3
    assert_close(default["blocks.0.mlp.fc1.weight"], torch.tensor([[2.2, 2.0], [3.6, 4.0]]))

    vit = tiny_vit()
    vit_specialists = {f: perturbed(vit, s) for f, s in [("fs", 1), ("fr", 2), ("efs", 3)]}
    zero = run("task_arithmetic", vit, vit_specialists, heads_for(vit_specialists, 24), lam=0.0)
    assert_same_backbone(zero.backbone, vit)


def test_task_arithmetic_with_lambda_one_over_n_is_averaging():
    vit = tiny_vit()
    specialists = {f: perturbed(vit, s) for f, s in [("fs", 1), ("fr", 2), ("efs", 3)]}
    heads = heads_for(specialists, 24)
    ta = run("task_arithmetic", vit, specialists, heads, lam=1 / 3).backbone
    assert_close(ta, run("average", vit, specialists, heads).backbone)


# ------------------------------------------------------------------------------------------------ R²M by hand


def one_key(values: dict[str, list[float]], key: str = "cls_token"):
    theta0 = {key: torch.zeros(1, 1, len(next(iter(values.values()))))}
    specialists = {n: {key: torch.tensor([[v]])} for n, v in values.items()}
    return theta0, specialists, heads_for(values, dim=2)


def test_r2m_core_two_tasks_one_key_by_hand():
    # τ_a = (1, 0), τ_b = (0, 2): G = diag(1, 4), top eigenvector e_b, a = G·1/2 = (0.5, 2), w = (0, 0.5).
    theta0, specialists, heads = one_key({"a": [1.0, 0.0], "b": [0.0, 2.0]})
    result = run("r2m", theta0, specialists, heads, eta=0.0)
    assert_close(result.backbone["cls_token"], torch.tensor([[[0.0, 1.0]]]))  # τ̄ = (0.5, 1) projected on e₂
    assert result.diagnostics["spectrum"] == pytest.approx([4.0, 1.0])
    assert result.diagnostics["core_weights"] == pytest.approx({"a": 0.0, "b": 0.5})
    # k = N spans everything: the core is τ̄ itself
    assert_close(
        run("r2m", theta0, specialists, heads, k=2, eta=0.0).backbone["cls_token"], torch.tensor([[[0.5, 1.0]]])
    )
    # η = 1: r_a = (1, -1), r_b = (0, 1); norms √2, 1; m = (√2 + 1)/2; τ_res = ½(m/√2·r_a + m·r_b)
    m = (math.sqrt(2) + 1) / 2
    res = 0.5 * (m / math.sqrt(2) * torch.tensor([1.0, -1.0]) + m * torch.tensor([0.0, 1.0]))
    full = run("r2m", theta0, specialists, heads).backbone["cls_token"]
    assert_close(full, (torch.tensor([0.0, 1.0]) + res).reshape(1, 1, 2))
    no_matching = run("r2m", theta0, specialists, heads, norm_matching=False).backbone["cls_token"]
    assert_close(no_matching, torch.tensor([[[0.5, 1.0]]]))  # core + mean rᵢ = τ̄


def test_r2m_centered_core_by_hand():
    # τ_a = (3, 1), τ_b = (1, 1): centred rows ±(1, 0), τ̄ = (2, 1) -> core = (2, 0)
    theta0, specialists, heads = one_key({"a": [3.0, 1.0], "b": [1.0, 1.0]})
    centred = run("r2m", theta0, specialists, heads, center=True, eta=0.0).backbone["cls_token"]
    assert_close(centred, torch.tensor([[[2.0, 0.0]]]))
    # orthogonal shared and specific parts: τ = c ± d with c ⟂ d -> centred core is 0, uncentred core is c
    theta0, specialists, heads = one_key({"a": [2.0, 1.0], "b": [2.0, -1.0]})
    assert_close(
        run("r2m", theta0, specialists, heads, center=True, eta=0.0).backbone["cls_token"], torch.zeros(1, 1, 2)
    )
    assert_close(run("r2m", theta0, specialists, heads, eta=0.0).backbone["cls_token"], torch.tensor([[[2.0, 0.0]]]))


def three_task_case(rank_ratio_key: str = "blocks.0.mlp.fc1.weight"):
    """Rows (7,2,2), (2,4,1), (2,1,4) in an orthonormal basis of 16×4 matrices.

    A = 3(I + 2uuᵀ) with u = (2,1,1)/√6, so G = 9(I + 8uuᵀ): top eigenvector u, core = u(uᵀ1)·3 = (4, 2, 2) ≠ τ̄ =
    (11, 7, 7)/3, and residuals (3,0,0), (-2,2,-1), (-2,-1,2) all have norm 3.
    """
    theta0 = toy_theta0()
    basis = orthonormal_matrices(3, (16, 4))
    rows = {"a": [7.0, 2.0, 2.0], "b": [2.0, 4.0, 1.0], "c": [2.0, 1.0, 4.0]}
    specialists = {}
    for name, coefficients in rows.items():
        delta = sum(c * b for c, b in zip(coefficients, basis, strict=True))
        specialists[name] = with_deltas(theta0, {rank_ratio_key: delta})
    expand = lambda coefficients: sum(c * b for c, b in zip(coefficients, basis, strict=True))  # noqa: E731
    return theta0, specialists, heads_for(rows), expand


def test_r2m_core_and_residuals_three_tasks_by_hand():
    theta0, specialists, heads, expand = three_task_case()
    key = "blocks.0.mlp.fc1.weight"
    core_only = run("r2m", theta0, specialists, heads, eta=0.0)
    assert_close(delta_of(core_only, theta0)[key], expand([4.0, 2.0, 2.0]), atol=2e-6, rtol=0)
    diagnostics = core_only.diagnostics
    assert diagnostics["residual_norms_before"] == pytest.approx({"a": 3.0, "b": 3.0, "c": 3.0}, rel=1e-6)
    assert diagnostics["core_norm"] == pytest.approx(math.sqrt(24), rel=1e-6)
    assert diagnostics["spectrum"] == pytest.approx([81.0, 9.0, 9.0], rel=1e-6)
    # ρ = 1, η = 0.5: θ₀ + core + 0.5·(τ̄ − core), τ̄ − core = (-1, 1, 1)/3
    half = run("r2m", theta0, specialists, heads, rank_ratio=1.0, eta=0.5)
    assert_close(delta_of(half, theta0)[key], expand([4.0 - 1 / 6, 2.0 + 1 / 6, 2.0 + 1 / 6]), atol=2e-6, rtol=0)
    # relative: η = α‖core‖/‖τ_res‖ = 0.6·√24·√3
    relative = run("r2m", theta0, specialists, heads, rank_ratio=1.0, eta_mode="relative")
    assert relative.diagnostics["residual_norm"] == pytest.approx(1 / math.sqrt(3), rel=1e-6)
    assert relative.diagnostics["eta"] == pytest.approx(0.6 * math.sqrt(24) * math.sqrt(3), rel=1e-6)


def test_r2m_full_rank_equal_norms_eta_one_is_weight_averaging():
    theta0, specialists, heads, _ = three_task_case()
    averaged = run("average", theta0, specialists, heads).backbone
    merged = run("r2m", theta0, specialists, heads, rank_ratio=1.0, eta=1.0, eta_mode="fixed")
    assert merged.diagnostics["residual_scales"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0}, rel=1e-6)
    assert_close(merged.backbone, averaged)
    # the same specialists with η ≠ 1 are not the average: the check above can fail
    other = run("r2m", theta0, specialists, heads, rank_ratio=1.0, eta=0.5).backbone
    assert not torch.allclose(other["blocks.0.mlp.fc1.weight"], averaged["blocks.0.mlp.fc1.weight"])


def test_r2m_multiples_of_one_rank_one_matrix_by_hand():
    # τᵢ = cᵢ·v, v = x yᵀ (rank 1), c = (1, 2, 6): core = τ̄ = 3v; rᵢ = (cᵢ − 3)v = (-2, -1, 3)v is rank 1, so any
    # ρ keeps it; norms (2, 1, 3)‖v‖, m = 2‖v‖ -> τ_res = ⅓·2‖v‖·(-1 - 1 + 1)·v/‖v‖ = -⅔v.
    theta0 = toy_theta0()
    key = "blocks.0.mlp.fc1.weight"
    v = torch.outer(torch.arange(1.0, 17.0) / 8, torch.tensor([1.0, -2.0, 0.5, 1.0]))
    c = {"a": 1.0, "b": 2.0, "c": 6.0}
    specialists = {n: with_deltas(theta0, {key: ci * v}) for n, ci in c.items()}
    heads = heads_for(c)
    for eta in [0.0, 1.0, 1.5]:
        result = run("r2m", theta0, specialists, heads, eta=eta, rank_ratio=0.1)
        assert_close(delta_of(result, theta0)[key], ((3 - 2 / 3 * eta) * v).to(F64), atol=2e-5, rtol=0)
    diagnostics = result.diagnostics
    assert diagnostics["kept_rank"][key] == 1
    assert diagnostics["residual_norms_after"] == pytest.approx(
        {"a": 2 * v.norm().item(), "b": v.norm().item(), "c": 3 * v.norm().item()}, rel=1e-5
    )
    assert diagnostics["core_fraction"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0}, rel=1e-9)
    # without norm matching the residuals cancel: τ_res = mean (cᵢ − 3)v = 0
    plain = run("r2m", theta0, specialists, heads, norm_matching=False)
    assert_close(delta_of(plain, theta0)[key], (3 * v).to(F64), atol=2e-5, rtol=0)
    # relative: ‖η·τ_res‖ = α‖core‖ -> θ* = θ₀ + 3v − 0.6·3v
    relative = run("r2m", theta0, specialists, heads, eta_mode="relative", alpha=0.6)
    assert_close(delta_of(relative, theta0)[key], (1.2 * v).to(F64), atol=2e-5, rtol=0)
    core_norm = run("r2m", theta0, specialists, heads, eta_mode="core_norm", alpha=0.4).diagnostics
    assert core_norm["eta"] == pytest.approx(0.4 * 3 * v.norm().item(), rel=1e-6)


def test_norm_matching_scales_by_hand():
    norms, scale = torch.tensor([2.0, 0.0, 1.0], dtype=F64), torch.ones(3, dtype=F64)
    # m = mean over all N (a zero residual counts as 0) = 1; cᵢ = (m/nᵢ)/N; the zero residual stays 0
    assert_close(r2m.residual_scales(norms, scale, norm_matching=True), torch.tensor([0.5, 0.0, 1.0], dtype=F64) / 3)
    assert_close(r2m.residual_scales(norms, scale, norm_matching=False), torch.tensor([1.0, 0.0, 1.0], dtype=F64) / 3)
    # a residual at round-off level of its scale (‖τᵢ‖ + ‖τ_core‖) counts as zero
    tiny = torch.tensor([1e-14, 1.0], dtype=F64)
    assert_close(
        r2m.residual_scales(tiny, torch.tensor([10.0, 10.0], dtype=F64), True), torch.tensor([0.0, 0.5], dtype=F64) / 2
    )


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_r2m_core_is_the_projection_on_the_top_singular_vectors_of_the_stacked_matrix(k, center):
    vit = tiny_vit()
    specialists = {f: perturbed(vit, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}
    result = run("r2m", vit, specialists, heads_for(specialists, 24), k=k, center=center, eta=0.0)
    # the explicit N×D matrix M over L (not norms, not biases): what R²M must never build, fine for a test
    in_l = [key for key in vit if not key.endswith("bias") and "norm" not in key]
    m = torch.stack(
        [torch.cat([(specialists[n][key].to(F64) - vit[key].to(F64)).reshape(-1) for key in in_l]) for n in "abc"]
    )
    mean = m.mean(0)
    _, _, vh = torch.linalg.svd(m - mean if center else m, full_matrices=False)
    core = vh[:k].T @ (vh[:k] @ mean)
    delta = delta_of(result, vit)
    assert_close(torch.cat([delta[key].reshape(-1) for key in in_l]), core, atol=2e-6, rtol=1e-5)
    for key in set(vit) - set(in_l):  # norms and biases: τ_core = τ̄
        expected = torch.stack([specialists[n][key].to(F64) - vit[key].to(F64) for n in "abc"]).mean(0)
        assert_close(delta[key], expected, atol=2e-6, rtol=1e-5)


def test_r2m_equal_block_weight_makes_the_core_invariant_to_rescaling_one_key():
    theta0 = toy_theta0()
    specialists = {f: perturbed(theta0, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}
    scaled_key, other_key = "pos_embed", "blocks.0.attn.qkv.weight"
    rescaled = {
        f: with_deltas(theta0, {scaled_key: 40 * (sd[scaled_key].to(F64) - theta0[scaled_key].to(F64))})
        for f, sd in specialists.items()
    }
    for f in rescaled:
        rescaled[f] = {k: (rescaled[f][k] if k == scaled_key else specialists[f][k]) for k in theta0}
    heads = heads_for(specialists)

    def core(sds, weighting):
        return delta_of(run("r2m", theta0, sds, heads, eta=0.0, block_weight=weighting), theta0)

    equal, equal_rescaled = core(specialists, "equal"), core(rescaled, "equal")
    assert_close(equal_rescaled[other_key], equal[other_key], atol=1e-6, rtol=1e-5)
    assert_close(equal_rescaled[scaled_key], 40 * equal[scaled_key], atol=1e-4, rtol=1e-5)
    none, none_rescaled = core(specialists, "none"), core(rescaled, "none")
    assert not torch.allclose(none_rescaled[other_key], none[other_key], atol=1e-4)


# ------------------------------------------------------------------------------------------------ truncation


def test_r2m_truncation_bounds_the_rank_of_each_residual_block():
    theta0 = toy_theta0(d=8)
    specialists = {f: perturbed(theta0, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}
    heads = heads_for(specialists, 8)
    core = delta_of(run("r2m", theta0, specialists, heads, eta=0.0), theta0)
    # ρ = 0.25 of 8 -> q = 2 per task, so η·τ_res has rank ≤ N·q = 6 < 8 per block; η = 100 lifts it far above the
    # float32 round-off of θ*, so the rank can be read off the singular values.
    for truncation, rank in [(True, 6), (False, 8)]:
        merged = delta_of(
            run("r2m", theta0, specialists, heads, rank_ratio=0.25, truncation=truncation, eta=100.0), theta0
        )
        for key in ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight"]:
            residual = merged[key] - core[key]
            for block in residual.reshape(-1, 8, 8) if "qkv" in key else [residual]:
                s = torch.linalg.svdvals(block)
                assert s[rank - 1] > 1e-3 * s[0], (key, truncation, s)
                assert rank == 8 or s[rank] < 1e-4 * s[0], (key, truncation, s)


def test_r2m_truncation_off_equals_full_rank_ratio():
    theta0 = toy_theta0()
    specialists = {f: perturbed(theta0, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}
    heads = heads_for(specialists)
    off = run("r2m", theta0, specialists, heads, truncation=False).backbone
    assert_close(off, run("r2m", theta0, specialists, heads, rank_ratio=1.0).backbone)
    assert not torch.allclose(
        off["blocks.0.mlp.fc1.weight"],
        run("r2m", theta0, specialists, heads, rank_ratio=0.25).backbone["blocks.0.mlp.fc1.weight"],
    )


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_r2m_fused_qkv_equals_split_q_k_v(svd):
    d = 24  # q = ⌊0.1·24⌋ = 2 per d×d block; a whole-matrix truncation of the fused 72×24 would keep 2, not 3×2
    fused = toy_theta0(d=d)
    specialists = {f: perturbed(fused, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}

    def split(sd):
        out = {}
        for k, v in sd.items():
            if k == "blocks.0.attn.qkv.weight":
                q, kk, vv = split_qkv(v)
                out.update({"blocks.0.attn.q.weight": q, "blocks.0.attn.k.weight": kk, "blocks.0.attn.v.weight": vv})
            else:
                out[k] = v
        return out

    heads = heads_for(specialists, d)
    a = run("r2m", fused, specialists, heads, svd=svd, eta_mode="relative")
    b = run("r2m", split(fused), {f: split(sd) for f, sd in specialists.items()}, heads, svd=svd, eta_mode="relative")
    assert a.diagnostics["kept_rank"]["blocks.0.attn.qkv.weight"] == 2
    assert_close(split(a.backbone), b.backbone, atol=1e-6, rtol=1e-5)
    assert a.diagnostics["eta"] == pytest.approx(b.diagnostics["eta"], rel=1e-9)


def test_r2m_exact_and_randomized_svd_agree():
    # fine-tune-like residuals: geometrically decaying spectra. Stated tolerance: 1e-4 relative per key.
    d = 48  # q = 4; q + oversampling 16 < 48 so the randomized path runs
    theta0 = toy_theta0(d=d)
    g = torch.Generator().manual_seed(7)
    specialists = {}
    for name in "abc":
        deltas = {}
        for key in [
            "blocks.0.attn.qkv.weight",
            "blocks.0.attn.proj.weight",
            "blocks.0.mlp.fc1.weight",
            "blocks.0.mlp.fc2.weight",
        ]:
            m, n = theta0[key].shape
            x, y = torch.randn(m, 12, generator=g), torch.randn(n, 12, generator=g)
            deltas[key] = 0.01 * (x * 0.5 ** torch.arange(12.0)) @ y.T
        specialists[name] = with_deltas(theta0, deltas)
    heads = heads_for(specialists, d)
    exact = delta_of(run("r2m", theta0, specialists, heads, svd="exact", eta=2.0), theta0)
    randomized = delta_of(run("r2m", theta0, specialists, heads, svd="randomized", eta=2.0), theta0)
    for key in exact:
        scale = exact[key].norm().item()
        assert (randomized[key] - exact[key]).norm().item() <= 1e-4 * scale + 1e-7, key


# ------------------------------------------------------------------------------------------------ invariants


R2M_SETTINGS = [
    {},
    {"rank_ratio": 0.25, "eta": 3.0},
    {"rank_ratio": 1.0, "eta_mode": "core_norm"},
    {"eta_mode": "relative", "svd": "randomized"},
    {"k": 2, "block_weight": "equal", "norm_matching": False},
    {"truncation": False, "eta_mode": "relative", "alpha": 0.8},
]


@pytest.mark.parametrize("settings", R2M_SETTINGS)
def test_identical_specialists_give_that_specialist(settings):
    vit = tiny_vit()
    specialist = perturbed(vit, 1)
    specialists = {"fs": specialist, "fr": dict(specialist), "efs": {k: v.clone() for k, v in specialist.items()}}
    heads = heads_for(specialists, 24)
    assert_same_backbone(run("r2m", vit, specialists, heads, **settings).backbone, specialist)
    assert_same_backbone(run("average", vit, specialists, heads).backbone, specialist)


@pytest.mark.parametrize("settings", R2M_SETTINGS + [{"center": True, "eta_mode": "relative"}])
def test_zero_task_vectors_give_theta0_without_nan(settings):
    vit = tiny_vit()
    specialists = {f: {k: v.clone() for k, v in vit.items()} for f in ["fs", "fr", "efs"]}
    heads = heads_for(specialists, 24)
    for result in [
        run("r2m", vit, specialists, heads, **settings),
        run("average", vit, specialists, heads),
        run("task_arithmetic", vit, specialists, heads),
    ]:
        assert_same_backbone(result.backbone, vit)
        json.dumps(result.diagnostics, allow_nan=False)


def test_keys_with_zero_task_vectors_stay_theta0_bit_for_bit():
    theta0 = toy_theta0()
    frozen = ["patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight"]
    specialists = {}
    for f, s in [("a", 1), ("b", 2), ("c", 3)]:
        sd = perturbed(theta0, s)
        specialists[f] = {k: (theta0[k].clone() if k in frozen else v) for k, v in sd.items()}
    heads = heads_for(specialists)
    for name in MERGERS:
        out = run(name, theta0, specialists, heads).backbone
        for k in frozen:
            assert torch.equal(out[k], theta0[k]), (name, k)
        assert not torch.equal(out["blocks.0.mlp.fc1.weight"], theta0["blocks.0.mlp.fc1.weight"]), name


@pytest.mark.parametrize("name", list(MERGERS))
def test_output_has_theta0_keys_shapes_and_dtypes(name):
    mixed = toy_theta0(
        dtypes={
            "pos_embed": torch.bfloat16,
            "blocks.0.mlp.fc2.weight": torch.float16,
            "blocks.0.norm2.bias": torch.float16,
            "blocks.0.attn.qkv.weight": torch.bfloat16,
        }
    )
    mixed["step"] = torch.tensor(7)  # a non-floating buffer is carried over
    vit = tiny_vit()
    for theta0 in [mixed, vit]:
        specialists = {f: perturbed(theta0, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}
        for sd in specialists.values():
            if "step" in sd:
                sd["step"] = torch.tensor(7)
        result = run(name, theta0, specialists, heads_for(specialists, theta0["cls_token"].shape[-1]))
        assert list(result.backbone) == list(theta0)
        for k, v in theta0.items():
            assert result.backbone[k].shape == v.shape and result.backbone[k].dtype == v.dtype, k
            assert torch.isfinite(result.backbone[k].float()).all(), k
        assert set(result.head) == {"weight", "bias"}


@pytest.mark.parametrize("name", list(MERGERS))
def test_task_order_does_not_matter(name):
    vit = tiny_vit()
    models = [perturbed(vit, s) for s in (1, 2, 3)]
    head_list = list(heads_for("abc", 24).values())
    kwargs = {"r2m": {"k": 2, "block_weight": "equal", "rank_ratio": 0.25, "eta_mode": "relative"}}.get(name, {})
    results = []
    for order in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:
        if name in FAMILY_SEEDED:  # the same families in another mapping order
            specialists = {"abc"[j]: models[j] for j in order}
            heads = {"abc"[j]: head_list[j] for j in order}
        else:  # the same models under other family names
            specialists = {"abc"[i]: models[j] for i, j in enumerate(order)}
            heads = {"abc"[i]: head_list[j] for i, j in enumerate(order)}
        results.append(run(name, vit, specialists, heads, **kwargs))
    for other in results[1:]:
        assert_close(other.backbone, results[0].backbone, atol=1e-6, rtol=1e-5)
        assert_close(other.head, results[0].head)
    if name == "r2m":
        for other in results[1:]:
            assert other.diagnostics["eta"] == pytest.approx(results[0].diagnostics["eta"], rel=1e-9)


def test_centered_r2m_runs_on_a_real_vit_and_differs_from_uncentered():
    vit = tiny_vit()
    specialists = {f: perturbed(vit, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}
    heads = heads_for(specialists, 24)
    centred = run("r2m", vit, specialists, heads, center=True)
    plain = run("r2m", vit, specialists, heads)
    # the shared direction dominates these task vectors: centring removes it, so far less of τ̄ is core
    assert centred.diagnostics["core_norm"] < 0.5 * plain.diagnostics["core_norm"]
    assert not torch.allclose(centred.backbone["blocks.0.mlp.fc1.weight"], plain.backbone["blocks.0.mlp.fc1.weight"])


# ------------------------------------------------------------------------------------------------ diagnostics


def test_r2m_diagnostics_are_json_and_complete():
    vit = tiny_vit()
    specialists = {f: perturbed(vit, s) for f, s in [("fs", 1), ("fr", 2), ("efs", 3)]}
    result = run("r2m", vit, specialists, heads_for(specialists, 24), eta_mode="core_norm")
    diagnostics = json.loads(json.dumps(result.diagnostics, allow_nan=False))
    assert diagnostics["families"] == ["efs", "fr", "fs"]
    spectrum = diagnostics["spectrum"]
    assert len(spectrum) == 3 and spectrum == sorted(spectrum, reverse=True)
    for per_task in [
        "residual_norms_before",
        "residual_norms_after",
        "core_fraction",
        "subspace_fraction",
        "task_vector_norms",
        "residual_scales",
        "core_weights",
    ]:
        assert set(diagnostics[per_task]) == {"fs", "fr", "efs"}, per_task
    for f in ["fs", "fr", "efs"]:
        assert diagnostics["residual_norms_after"][f] < diagnostics["residual_norms_before"][f]  # truncation bites
        assert 0 < diagnostics["core_fraction"][f] <= 1
    # d = 24, ρ = 0.1: every matrix (a qkv per 24×24 block, fc1 96×24, fc2 24×96) keeps rank 2
    matrix_keys = [
        k
        for k in vit
        if k.startswith("blocks.") and k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))
    ]
    assert diagnostics["kept_rank"] == {k: 2 for k in matrix_keys}
    assert diagnostics["eta"] == pytest.approx(0.6 * diagnostics["core_norm"])
    assert set(diagnostics["timings_s"]) >= {"pass1_gram", "eigen", "pass2_residuals", "pass3_combine", "total"}
    for name in ["average", "task_arithmetic"]:
        json.dumps(run(name, vit, specialists, heads_for(specialists, 24)).diagnostics, allow_nan=False)


def test_mergers_stream_lazy_specialists_key_by_key():
    vit = tiny_vit()
    eager = {f: perturbed(vit, s) for f, s in [("a", 1), ("b", 2), ("c", 3)]}
    eager["a"]["blocks.1.mlp.fc2.weight"] = vit["blocks.1.mlp.fc2.weight"].clone()  # one frozen key in all three
    eager["b"]["blocks.1.mlp.fc2.weight"] = vit["blocks.1.mlp.fc2.weight"].clone()
    eager["c"]["blocks.1.mlp.fc2.weight"] = vit["blocks.1.mlp.fc2.weight"].clone()
    heads = heads_for(eager, 24)
    for name in MERGERS:
        reads = {f: Counter() for f in eager}
        lazy = {f: LazyStateDict(sd, reads[f]) for f, sd in eager.items()}
        result = run(name, vit, lazy, heads)
        assert_close(result.backbone, run(name, vit, eager, heads).backbone, atol=0, rtol=0)
        for f in eager:
            assert set(reads[f]) == set(vit)
            assert max(reads[f].values()) == PASSES.get(name, 1), (name, f)
            assert reads[f]["blocks.1.mlp.fc2.weight"] == FROZEN_READS.get(name, 1), name  # not once per pass


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("rank_ratio", [0.0, -0.1, 1.5, 10, float("nan"), True])
def test_rank_ratio_outside_unit_interval_is_refused(rank_ratio):
    with pytest.raises(ValueError, match="rank_ratio"):
        run("r2m", Untouchable(), {"a": Untouchable(), "b": Untouchable()}, {}, rank_ratio=rank_ratio)


@pytest.mark.parametrize(
    "knobs",
    [
        {"k": 3},
        {"k": 0},
        {"k": 1.0},
        {"svd": "lanczos"},
        {"eta_mode": "adaptive"},
        {"block_weight": "norm"},
        {"eta": float("inf")},
        {"center": "yes"},
    ],
)
def test_bad_r2m_knobs_are_refused_before_any_work(knobs):
    with pytest.raises(ValueError, match=next(iter(knobs))):
        run("r2m", Untouchable(), {"a": Untouchable(), "b": Untouchable()}, {}, **knobs)


def test_bad_lambda_is_refused():
    theta0, specialists, heads = hand_case()
    with pytest.raises(ValueError, match="lam"):
        run("task_arithmetic", theta0, specialists, heads, lam=float("nan"))


def broken_cases():
    theta0 = toy_theta0()
    good = perturbed(theta0, 1)
    missing = {k: v for k, v in perturbed(theta0, 2).items() if k != "blocks.0.mlp.fc1.bias"}
    extra = dict(perturbed(theta0, 2), **{"head.weight": torch.zeros(2, 4)})
    shape = dict(perturbed(theta0, 2), **{"blocks.0.attn.proj.weight": torch.zeros(4, 5)})
    dtype = dict(perturbed(theta0, 2), **{"pos_embed": theta0["pos_embed"].half()})
    nan = perturbed(theta0, 2)
    nan["blocks.0.mlp.fc2.weight"][1, 3] = float("nan")
    inf = perturbed(theta0, 2)
    inf["norm.bias"][0] = float("inf")
    return (
        theta0,
        good,
        [
            (missing, ["missing", "blocks.0.mlp.fc1.bias"]),
            (extra, ["unexpected", "head.weight"]),
            (shape, ["shape", "blocks.0.attn.proj.weight", "(4, 5)"]),
            (dtype, ["dtype", "pos_embed", "float16"]),
            (nan, ["non-finite", "blocks.0.mlp.fc2.weight"]),
            (inf, ["non-finite", "norm.bias"]),
        ],
    )


@pytest.mark.parametrize("name", [*MERGERS, "check_compatible"])
def test_incompatible_specialists_are_refused_by_name(name):
    theta0, good, cases = broken_cases()
    for broken, fragments in cases:
        specialists = {"fs": good, "efs_bad": broken}
        with pytest.raises(ValueError) as error:
            if name == "check_compatible":
                check_compatible(theta0, specialists)
            else:
                run(name, theta0, specialists, heads_for(specialists))
        message = str(error.value)
        assert "efs_bad" in message and "'fs'" not in message, message
        for fragment in fragments:
            assert fragment in message, (fragment, message)
    check_compatible(theta0, {"fs": good, "fr": perturbed(theta0, 3)})  # compatible ones pass


def test_heads_must_match_the_specialists():
    theta0 = toy_theta0()
    specialists = {"fs": perturbed(theta0, 1), "fr": perturbed(theta0, 2)}
    for name in MERGERS:
        with pytest.raises(ValueError, match="fr"):
            run(name, theta0, specialists, heads_for(["fs"]))
    bad_heads = heads_for(specialists)
    bad_heads["fr"]["weight"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="fr"):
        average_heads(bad_heads)


def test_factor_gram_equals_the_gram_of_the_dense_products():
    from r2m_lab.mergers.r2m import factor_gram

    gen = torch.Generator().manual_seed(3)
    us, vh = torch.randn(3, 2, 7, 2, generator=gen), torch.randn(3, 2, 2, 5, generator=gen)
    dense = (us.double() @ vh.double()).reshape(3, -1)
    assert_close(factor_gram(us, vh), dense @ dense.T, rtol=1e-12, atol=1e-12)
