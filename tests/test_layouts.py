"""Weight layouts → timm keys, exactly or refused: each layout is built by its own library (transformers, open_clip)
at toy size, saved as its users save it, loaded through r2m_lab, and the original and converted models must give the
same features on the same input."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r2m_lab.backbones import create_backbone
from r2m_lab.layouts import (
    NotAStateDict,
    WeightsMismatch,
    convert,
    detect_layout,
    load_backbone_file,
    main,
    read_state_dict,
)
from r2m_lab.weights import file_sha256

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

WIDTH, DEPTH, HEADS, PATCH, IMAGE, MLP = 32, 2, 2, 8, 32, 64
# timm's CLIP tower at the toy size: QuickGELU, pre-norm, no patch bias (what vit_*_clip_quickgelu_* build).
TIMM_MODEL = "vit_base_patch16_clip_quickgelu_224"
TIMM_KWARGS = {
    "img_size": IMAGE,
    "patch_size": PATCH,
    "embed_dim": WIDTH,
    "depth": DEPTH,
    "num_heads": HEADS,
    "mlp_ratio": MLP / WIDTH,
}
CFG = {"name": "toy_clip", "model": TIMM_MODEL, "kwargs": TIMM_KWARGS, "weights": {"path": None, "required": True}}


def timm_model(**overrides) -> nn.Module:
    return timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0, **{**TIMM_KWARGS, **overrides}).eval()


def hf_vision_config(**overrides):
    base = dict(
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=16,
        hidden_act="quick_gelu",
    )
    return transformers.CLIPVisionConfig(**{**base, **overrides})


def hf_clip_model(seed: int = 0):
    torch.manual_seed(seed)
    text = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    text.update(max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg = transformers.CLIPConfig(vision_config=hf_vision_config().to_dict(), text_config=text, projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    _randomise(model)
    return model


def _randomise(model: nn.Module) -> None:
    # Fresh-init LayerNorms are exactly 1/0: random values make a swapped or dropped norm visible in the features.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def loaded(path) -> nn.Module:
    return create_backbone({**CFG, "weights": {"path": str(path), "required": True}}).eval()


@torch.no_grad()
def test_hf_clip_model_file_gives_the_pooler_output(tmp_path):
    """CLIPModel (openai/clip-vit-* on the hub): vision_model.* converted, q/k/v fused, text tower a listed extra."""
    hf = hf_clip_model()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    model = loaded(path)
    torch.testing.assert_close(model(images()), hf.vision_model(pixel_values=images()).pooler_output)
    source = model.r2m_weights_source
    assert source["layout"] == "hf_clip" and source["sha256"] == file_sha256(path)
    assert source["extras_ignored"]["text tower"] > 0 and any("projection" in k for k in source["extras_ignored"])


@torch.no_grad()
def test_hf_clip_vision_model_files_of_both_transformers_generations(tmp_path):
    """transformers 4 writes CLIPVisionModel as vision_model.* (+ a position_ids buffer); 5 writes it bare."""
    hf = transformers.CLIPVisionModel(hf_vision_config()).eval()
    _randomise(hf)
    expected = hf(pixel_values=images()).pooler_output
    hf.save_pretrained(tmp_path / "v5")
    bare = load_file(str(tmp_path / "v5" / "model.safetensors"))
    old = {f"vision_model.{k}": v for k, v in bare.items()}
    old["vision_model.embeddings.position_ids"] = torch.arange((IMAGE // PATCH) ** 2 + 1)[None]
    torch.save(old, tmp_path / "pytorch_model.bin")
    for path, layout in [
        (tmp_path / "v5" / "model.safetensors", "hf_clip_vision_transformer"),
        (tmp_path / "pytorch_model.bin", "hf_clip"),
    ]:
        model = loaded(path)
        assert model.r2m_weights_source["layout"] == layout
        torch.testing.assert_close(model(images()), expected)


@torch.no_grad()
def test_open_clip_checkpoint_gives_encode_image_before_its_projection(tmp_path):
    """open_clip's full CLIP (OpenAI layout) from DataParallel (module.): features @ visual.proj = encode_image."""
    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH)
    vision.image_size, vision.mlp_ratio = IMAGE, MLP / WIDTH
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=WIDTH, heads=2, layers=1)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    _randomise(clip)
    state = {f"module.{k}": v for k, v in clip.state_dict().items()}
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    model = loaded(tmp_path / "open_clip_pytorch_model.bin")
    assert model.r2m_weights_source["layout"] == "openai_clip" and model.r2m_weights_source["prefix"] == "module."
    torch.testing.assert_close(model(images()) @ clip.visual.proj, clip.encode_image(images()))


@torch.no_grad()
def test_deepfakebench_detector_as_backbone_weights(tmp_path):
    """A DF40 CLIP detector (backbone.<CLIPModel.vision_model keys>, head.*, module.): the backbone loads, the head
    is a listed extra, and features are its pooler_output."""
    hf = hf_clip_model(seed=3)
    state = {f"module.backbone.{k}": v for k, v in hf.vision_model.state_dict().items()}
    state.update({"module.head.weight": torch.randn(2, WIDTH), "module.head.bias": torch.randn(2)})
    torch.save(state, tmp_path / "ckpt_best.pth")
    model = loaded(tmp_path / "ckpt_best.pth")
    assert model.r2m_weights_source["layout"] == "deepfakebench_clip"
    assert model.r2m_weights_source["extras_ignored"] == {"detector head (stage=import reads it)": 2}
    torch.testing.assert_close(model(images()), hf.vision_model(pixel_values=images()).pooler_output)


def test_timm_file_and_lightning_wrapper(tmp_path):
    source = timm_model()
    state = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    wrapped = {"state_dict": {**state, "head.weight": torch.randn(16, WIDTH)}, "epoch": 3}
    torch.save(wrapped, tmp_path / "last.ckpt")
    model = loaded(tmp_path / "last.ckpt")
    assert model.r2m_weights_source["wrapper"] == "state_dict"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _hf_file(tmp_path, state, name="m.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_a_stray_tensor_is_refused_by_name(tmp_path):
    state = dict(hf_clip_model().state_dict())
    state["vision_model.encoder.layers.0.adapter.weight"] = torch.zeros(4)
    with pytest.raises(WeightsMismatch, match=r"1 tensor\(s\) of the file unused: vision_model\.encoder\.layers\.0"):
        loaded(_hf_file(tmp_path, state))


def test_a_missing_tensor_and_an_incomplete_qkv_are_refused_by_name(tmp_path):
    state = dict(hf_clip_model().state_dict())
    del state["vision_model.post_layernorm.bias"]
    del state["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(WeightsMismatch) as err:
        loaded(_hf_file(tmp_path, state))
    text = str(err.value)
    assert "left unfilled: blocks.1.attn.qkv.weight, norm.bias" in text
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in text  # the triple's orphans are unused


def test_a_file_of_another_size_is_refused_with_shapes(tmp_path):
    path = _hf_file(tmp_path, hf_clip_model().state_dict())
    with pytest.raises(WeightsMismatch, match=r"shape mismatch.*pos_embed: file \(1, 17, 32\), model \(1, 5, 32\)"):
        create_backbone({**CFG, "kwargs": {**TIMM_KWARGS, "img_size": 16}, "weights": {"path": str(path)}})
    with pytest.raises(WeightsMismatch, match=r"left unfilled: blocks\.2\."):
        create_backbone({**CFG, "kwargs": {**TIMM_KWARGS, "depth": 3}, "weights": {"path": str(path)}})


def test_two_files_give_two_theta0(tmp_path):
    """The old loader used 0 tensors of an HF file: two different files gave one bit-identical random θ₀."""
    a = loaded(_hf_file(tmp_path, hf_clip_model(seed=1).state_dict(), "a.safetensors")).state_dict()
    b = loaded(_hf_file(tmp_path, hf_clip_model(seed=2).state_dict(), "b.safetensors")).state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_unknown_layout_and_non_tensor_files_are_refused(tmp_path):
    with pytest.raises(NotAStateDict, match="unrecognised weight layout.*encoder.weight"):
        detect_layout({"encoder.weight", "decoder.weight"})
    torch.save({"weights": {"a": torch.zeros(1)}, "note": "x"}, tmp_path / "odd.pth")
    with pytest.raises(NotAStateDict, match=r"non-tensor entries \['note', 'weights'\]"):
        read_state_dict(tmp_path / "odd.pth")


class Holder(nn.Module):
    """A module whose parameters carry OpenAI CLIP's names, so its TorchScript archive looks like ViT-*.pt."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            if value.is_floating_point():
                module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
            else:
                module.register_buffer(leaf, value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def test_torchscript_archive_is_refused_then_converted_knowingly(tmp_path, capsys):
    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH)
    vision.image_size, vision.mlp_ratio = IMAGE, MLP / WIDTH
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=WIDTH, heads=2, layers=1)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    _randomise(clip)
    state = {k: v.half() if v.is_floating_point() else v for k, v in clip.state_dict().items()}  # OpenAI ships fp16
    state["input_resolution"] = torch.tensor(IMAGE)  # the scalar buffers OpenAI's archives carry
    src, dst = tmp_path / "ViT-T-8.pt", tmp_path / "ViT-T-8.safetensors"
    torch.jit.save(torch.jit.script(Holder(state)), str(src))
    with pytest.raises(NotAStateDict, match=r"(?s)TorchScript archive.*convert-torchscript .*ViT-T-8.pt .* --i-trust"):
        loaded(src)
    with pytest.raises(SystemExit):
        main(["convert-torchscript", str(src), str(dst)])  # without the flag: refused
    assert "--i-trust-this-file" in capsys.readouterr().err and not dst.exists()
    assert main(["convert-torchscript", str(src), str(dst), "--i-trust-this-file"]) == 0
    model = loaded(dst)
    assert model.r2m_weights_source["extras_ignored"]["TorchScript buffer"] == 1
    expected = clip.half().float().encode_image(images())  # fp16-rounded weights, as in the archive
    torch.testing.assert_close(model(images()) @ clip.visual.proj, expected)


def test_convert_accounts_for_every_key():
    """Every tensor of a file lands in timm keys, a listed extra, the head or the unknown list: none vanishes."""
    hf = hf_clip_model()
    state = {f"module.backbone.{k}": v for k, v in hf.vision_model.state_dict().items()}
    state.update({"module.head.weight": torch.zeros(2, WIDTH), "module.head.bias": torch.zeros(2)})
    c = convert(state)
    seen = {s for v in c.sources.values() for s in v} | set(c.extras) | set(c.unknown)
    seen |= {f"module.head.{k}" for k in c.head}
    assert seen == set(state) and not c.unknown and c.prefix == "module."


def test_load_backbone_file_reports_extras_for_the_card(tmp_path):
    path = _hf_file(tmp_path, hf_clip_model().state_dict())
    info = load_backbone_file(timm_model(), path)
    assert info["path"] == str(path.resolve()) and info["bytes"] == path.stat().st_size and len(info["sha256"]) == 64


def test_inspect_names_the_layout_and_what_the_conversion_drops(tmp_path, capsys):
    """``python -m r2m_lab.layouts inspect FILE`` on a DeepfakeBench detector file (``module.`` prefix, head)."""
    hf = hf_clip_model()
    state = {f"module.backbone.{k}": v for k, v in hf.vision_model.state_dict().items()}
    state.update({"module.head.weight": torch.zeros(2, WIDTH), "module.head.bias": torch.zeros(2)})
    path = tmp_path / "ckpt_best.pth"
    torch.save(state, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout: deepfakebench_clip" in out and "prefix stripped: 'module.'" in out
    assert "head: ['bias', 'weight']" in out and "unrecognised keys: none" in out
