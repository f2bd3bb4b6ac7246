"""Checkpoint I/O, θ₀ hashing, lazy per-key access, and loading real backbone weights from a local file."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from r2m_lab.backbones import create_backbone, make_head
from r2m_lab.weights import Checkpoint, LazyStateDict, provenance, save_detector, state_dict_hash, write_card

# A CLIP-architecture ViT at toy width, so the real loading path runs without a download.
TOY_CLIP = {
    "name": "clip_toy",
    "model": "vit_base_patch16_clip_224.openai",
    "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
    "weights": {"path": None, "hub": False, "required": True},
}


def test_hash_ignores_order_but_not_values():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, 2, dtype=torch.bfloat16)}
    b = {"y": a["y"].clone(), "x": a["x"].clone()}
    assert state_dict_hash(a) == state_dict_hash(b)
    b["x"][0] = 1e-6
    assert state_dict_hash(a) != state_dict_hash(b)


def test_save_and_lazy_load_round_trip(tmp_path):
    backbone = {"blocks.0.w": torch.randn(3, 3), "cls_token": torch.randn(1, 1, 3).half()}
    head = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    path = tmp_path / "m.safetensors"
    save_detector(path, backbone, head, {"kind": "specialist", "base_hash": "abc"})
    write_card(path, {"kind": "specialist", "name": "m", "recipe": {"lr": 1e-4}})
    ckpt = Checkpoint(path)
    assert sorted(ckpt.backbone) == sorted(backbone) and ckpt.base_hash == "abc"
    for k, v in backbone.items():
        assert torch.equal(ckpt.backbone[k], v) and ckpt.backbone[k].dtype == v.dtype
    assert torch.equal(ckpt.head["weight"], head["weight"])
    assert ckpt.card()["recipe"] == {"lr": 1e-4} and "versions" in ckpt.card()
    assert "recipe" in path.with_suffix(".md").read_text()
    with pytest.raises(KeyError, match="nope"):
        LazyStateDict(path)["nope"]


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an r2m_lab detector checkpoint"):
        Checkpoint(path)


def test_head_init_depends_only_on_its_seed():
    a, b, c = make_head(8, 0), make_head(8, 0), make_head(8, 1)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_loads_from_a_local_file(tmp_path, suffix):
    source = timm.create_model(TOY_CLIP["model"], pretrained=False, num_classes=0, **TOY_CLIP["kwargs"])
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    cfg = {**TOY_CLIP, "weights": {**TOY_CLIP["weights"], "path": str(path)}}
    model = create_backbone(cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)


def test_clip_backbone_without_weights_says_how_to_provide_them():
    with pytest.raises(FileNotFoundError, match=r"backbone.weights.path=.*backbone.weights.hub=true"):
        create_backbone(TOY_CLIP)


def test_missing_weights_file_names_the_path(tmp_path):
    cfg = {**TOY_CLIP, "weights": {**TOY_CLIP["weights"], "path": str(tmp_path / "none.safetensors")}}
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        create_backbone(cfg)


def to_openai_clip_layout(state: dict[str, torch.Tensor], proj_dim: int = 16) -> dict[str, torch.Tensor]:
    """The same weights in OpenAI CLIP / open_clip's layout (``visual.*``, ``ln_*``, ``in_proj_*``, ...)."""
    out = {"transformer.resblocks.0.ln_1.weight": torch.ones(4)}  # a text-tower key: must be ignored
    for k, v in state.items():
        if k == "cls_token":
            k, v = "class_embedding", v.reshape(-1)
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        for timm_name, clip_name in [
            ("patch_embed.proj", "conv1"),
            ("blocks.", "transformer.resblocks."),
            ("norm_pre", "ln_pre"),
            ("norm1", "ln_1"),
            ("norm2", "ln_2"),
            ("attn.qkv.", "attn.in_proj_"),
            ("attn.proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ]:
            k = k.replace(timm_name, clip_name)
        if k.startswith("norm."):
            k = k.replace("norm.", "ln_post.")
        out[f"visual.{k}"] = v.clone()
    out["visual.proj"] = torch.randn(state["cls_token"].shape[-1], proj_dim)
    return out


def test_backbone_converts_an_open_clip_state_dict(tmp_path):
    source = timm.create_model(TOY_CLIP["model"], pretrained=False, num_classes=0, **TOY_CLIP["kwargs"])
    state = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(to_openai_clip_layout(state), path)
    model = create_backbone({**TOY_CLIP, "weights": {**TOY_CLIP["weights"], "path": str(path)}})
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    for k, v in loaded.items():
        torch.testing.assert_close(v, state[k], msg=k)


class NotWeights:
    """A pickled object: loading it would run arbitrary code paths, so it must be refused."""


def test_pickled_objects_in_a_weights_file_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": NotWeights()}, path)
    with pytest.raises(ValueError, match=r"pickled Python objects.*weights_only=True"):
        create_backbone({**TOY_CLIP, "weights": {**TOY_CLIP["weights"], "path": str(path)}})


def test_provenance_names_file_hash_and_layout(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    info = provenance(path, "timm", prefix="")
    # sha256("abc"), as sha256sum prints it
    assert info["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert info == {"path": str(path.resolve()), "bytes": 3, "sha256": info["sha256"], "layout": "timm", "prefix": ""}
    path.write_bytes(b"abcd")  # a changed file is hashed again (size/mtime key), not served from the cache
    assert provenance(path, "timm")["sha256"] != info["sha256"]


def test_a_weights_file_and_a_pretext_are_not_combined(tmp_path):
    source = timm.create_model(TOY_CLIP["model"], pretrained=False, num_classes=0, **TOY_CLIP["kwargs"])
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    cfg = {**TOY_CLIP, "weights": {**TOY_CLIP["weights"], "path": str(path), "pretext": {"steps": 4}}}
    with pytest.raises(ValueError, match="backbone.weights.pretext=null"):
        create_backbone(cfg)


def test_smoke_keeps_a_clip_backbone_and_its_weights(make_cfg):
    """debug=smoke shrinks the tiny ViT (and gives it a 4-step pretext) but leaves a CLIP's size and file alone."""
    tiny = make_cfg()
    assert tiny.backbone.kwargs.embed_dim == 24 and tiny.backbone.weights.pretext.steps == 4
    assert make_cfg(smoke=False).backbone.kwargs.embed_dim == 96
    clip = make_cfg("backbone=clip_vit_l14", "backbone.weights.path=/models/ViT-L-14.safetensors")
    assert clip.backbone.weights.path == "/models/ViT-L-14.safetensors" and clip.backbone.weights.pretext is None
    assert clip.backbone.kwargs == {} and clip.backbone.input_size == 224
    assert clip.backbone.recipe.max_steps == 3  # the run is still short
