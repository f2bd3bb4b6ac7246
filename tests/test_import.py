"""stage=import: DF40/DeepfakeBench-style CLIP detectors (built with transformers at toy size) become specialists
that score like the originals and that the real stage=merge merges; bad checkpoints are refused by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from r2m_lab.layouts import WeightsMismatch
from r2m_lab.stages import stage_function
from r2m_lab.stages.artifacts import base_path, specialist_names, specialist_path
from r2m_lab.stages.merge import merge
from r2m_lab.stages.models import load_detector
from r2m_lab.weights import Checkpoint, file_sha256

transformers = pytest.importorskip("transformers")

WIDTH, DEPTH, HEADS, PATCH, IMAGE, MLP = 32, 2, 2, 8, 32, 64
# The configured backbone: clip_vit_b16's QuickGELU CLIP tower at the toy size of the transformers models below.
BACKBONE = [
    "backbone=clip_vit_b16",
    f"++backbone.kwargs={{img_size:{IMAGE},patch_size:{PATCH},embed_dim:{WIDTH},depth:{DEPTH},num_heads:{HEADS},"
    f"mlp_ratio:{MLP / WIDTH}}}",
    f"backbone.input_size={IMAGE}",
]


def vision_model(seed: int):
    """CLIPModel(...).vision_model, what DeepfakeBench's CLIPDetector.backbone is, with random non-trivial weights."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_act="quick_gelu",
    )
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def fine_tuned(theta0: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A 'fine-tune' of θ₀ (small random moves) and a trained head (2, D): what one DF40 family detector holds."""
    gen = torch.Generator().manual_seed(seed)
    backbone = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()}
    head = {"weight": torch.randn(2, WIDTH, generator=gen), "bias": torch.randn(2, generator=gen)}
    return backbone, head


def save_dfb(path, backbone, head, module: bool = True) -> None:
    """DeepfakeBench's checkpoint: torch.save(model.state_dict()) of CLIPDetector, under DataParallel (module.)."""
    prefix = "module." if module else ""
    state = {f"{prefix}backbone.{k}": v for k, v in backbone.items()}
    state.update({f"{prefix}head.{k}": v for k, v in head.items()})
    torch.save(state, path)


@pytest.fixture
def released(tmp_path):
    """θ₀ as Hugging Face's CLIPModel file (vision_model.*) and one DF40-style detector per synthetic family."""
    theta0_model = vision_model(0)
    theta0 = dict(theta0_model.state_dict())  # transformers 5: the vision transformer's own keys (embeddings.*)
    theta0_file = tmp_path / "clip" / "model.safetensors"
    theta0_file.parent.mkdir()
    save_file({f"vision_model.{k}": v.contiguous() for k, v in theta0.items()}, str(theta0_file))
    detectors = {}
    for i, name in enumerate(["synthetic_swap", "synthetic_reenact", "synthetic_synthesis", "synthetic_edit"]):
        backbone, head = fine_tuned(theta0, seed=10 + i)
        path = tmp_path / "df40" / name / "ckpt_best.pth"
        path.parent.mkdir(parents=True)
        save_dfb(path, backbone, head, module=i % 2 == 0)  # with and without DataParallel's prefix
        detectors[name] = (path, backbone, head)
    return theta0_file, detectors


def import_overrides(theta0_file, checkpoints) -> list[str]:
    mapping = ",".join(f"{k}:'{v}'" for k, v in checkpoints.items())
    return [*BACKBONE, f"backbone.weights.path='{theta0_file}'", "stage=import", f"stage.checkpoints={{{mapping}}}"]


def hf_detector_logits(backbone, head, x):
    """DeepfakeBench's CLIPDetector.forward: head(backbone(x)['pooler_output'])."""
    model = vision_model(0)
    model.load_state_dict(backbone)
    with torch.no_grad():
        return torch.nn.functional.linear(model(pixel_values=x).pooler_output, head["weight"], head["bias"])


def test_import_then_merge_average(make_cfg, released):
    theta0_file, detectors = released
    cfg = make_cfg(*import_overrides(theta0_file, {n: p for n, (p, _, _) in detectors.items()}))
    assert sorted(detectors) == sorted(specialist_names(cfg))
    summary = stage_function("import")(cfg)
    base = Checkpoint(base_path(cfg))
    x = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    for name, (path, backbone, head) in detectors.items():
        ckpt = Checkpoint(specialist_path(cfg, name))
        assert ckpt.base_hash == base.base_hash and ckpt.metadata["kind"] == "specialist"
        card = ckpt.card()
        assert card["source"]["sha256"] == file_sha256(path) and card["source"]["layout"] == "deepfakebench_clip"
        assert card["base_source"]["sha256"] == file_sha256(theta0_file) and card["base_source"]["layout"] == "hf_clip"
        assert card["threshold"] == 0.5 and summary["specialists"][name]["reused"] is False
        with torch.no_grad():
            ours = load_detector(cfg, ckpt).eval()(x)
        torch.testing.assert_close(ours, hf_detector_logits(backbone, head, x))

    # The real merge stage on the imported specialists: average = the mean of the released weights.
    merge_cfg = make_cfg(*BACKBONE, f"backbone.weights.path='{theta0_file}'", "stage=merge", "merger=average")
    card = merge(merge_cfg)
    merged = Checkpoint(card["checkpoint_path"])
    mean_backbone = {
        k: torch.stack([d[1][k] for d in detectors.values()]).mean(0) for k in detectors["synthetic_swap"][1]
    }
    mean_head = {k: torch.stack([d[2][k] for d in detectors.values()]).mean(0) for k in ("weight", "bias")}
    with torch.no_grad():
        ours = load_detector(merge_cfg, merged).eval()(x)
    torch.testing.assert_close(ours, hf_detector_logits(mean_backbone, mean_head, x), rtol=1e-5, atol=1e-5)
    assert card["base_hash"] == base.base_hash

    # Importing again keeps them; another file for a family is not written over a specialist without overwrite.
    again = stage_function("import")(cfg)
    assert all(entry["reused"] for entry in again["specialists"].values())
    other = detectors["synthetic_edit"][0]
    swap_cfg = make_cfg(*import_overrides(theta0_file, {"synthetic_swap": other}))
    with pytest.raises(FileExistsError, match="stage.overwrite=true"):
        stage_function("import")(swap_cfg)
    import_stage = stage_function("import")
    import_stage(make_cfg(*import_overrides(theta0_file, {"synthetic_swap": other}), "stage.overwrite=true"))
    assert Checkpoint(specialist_path(cfg, "synthetic_swap")).card()["source"]["sha256"] == file_sha256(other)


def test_import_refuses_what_does_not_fit(make_cfg, released, tmp_path):
    theta0_file, detectors = released
    path, backbone, head = detectors["synthetic_swap"]
    # A tensor the backbone has no place for (e.g. a LoRA adapter): refused by name, nothing written.
    stray = tmp_path / "stray.pth"
    save_dfb(stray, {**backbone, "encoder.layers.0.lora_A": torch.zeros(4, WIDTH)}, head)
    cfg = make_cfg(*import_overrides(theta0_file, {"synthetic_swap": stray}))
    with pytest.raises(WeightsMismatch, match=r"unused: module\.backbone\.encoder\.layers\.0\.lora_A"):
        stage_function("import")(cfg)
    assert not specialist_path(cfg, "synthetic_swap").exists()
    # A head that is not Linear(D, 2).
    three = tmp_path / "three.pth"
    save_dfb(three, backbone, {"weight": torch.zeros(3, WIDTH), "bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"head must be a Linear\(32, 2\).*'weight': \(3, 32\)"):
        stage_function("import")(make_cfg(*import_overrides(theta0_file, {"synthetic_swap": three})))
    # A backbone-only file: no head to import.
    with pytest.raises(ValueError, match="without a real/fake head"):
        stage_function("import")(make_cfg(*import_overrides(theta0_file, {"synthetic_swap": theta0_file})))
    # A family the benchmark has no specialist for, and no θ₀.
    with pytest.raises(ValueError, match=r"not specialists of benchmark=synthetic"):
        stage_function("import")(make_cfg(*import_overrides(theta0_file, {"df40_fs_ff": path})))
    no_theta0 = [*BACKBONE, "stage=import", f"stage.checkpoints={{synthetic_swap:'{path}'}}"]
    with pytest.raises(ValueError, match="needs θ₀"):
        stage_function("import")(make_cfg(*no_theta0))
