"""Weight files in the layouts the field hands around, converted to timm's ViT keys exactly or refused by name.

A file is read (safetensors, or ``torch.load(weights_only=True)``), unwrapped (``{"state_dict": ...}``,
``{"model": ...}``, ``module.``/``_orig_mod.``/``model.`` prefixes), its layout detected from its keys, converted to
timm keys (q/k/v fused into ``qkv``, CLIP's ``(D,)`` class embedding → ``(1, 1, D)``...), then compared key by key
with the timm model: an expected tensor left unfilled, a tensor of the file left unused (other than the extras each
layout lists, e.g. CLIP's text tower) or a shape that differs stops the load with the names.

Layouts (:data:`LAYOUTS`):

- ``timm``: timm's own keys (``cls_token``, ``blocks.0.attn.qkv.weight``...); a ``head.*`` is an extra.
- ``openai_clip``: OpenAI CLIP's ``state_dict()`` and open_clip's ``open_clip_pytorch_model.bin`` (``visual.*``
  image tower; the text tower, ``logit_scale`` and the TorchScript buffers ``input_resolution``... are extras).
- ``open_clip_timm``: open_clip models with a timm trunk (``visual.trunk.*``; ``visual.head.*`` is an extra).
- ``hf_clip``: Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel``
  (``vision_model.*``; ``text_model.*``, ``visual_projection``, ``text_projection``, ``logit_scale`` are extras).
- ``hf_clip_vision_transformer``: the state dict of ``CLIPModel.vision_model`` itself (``embeddings.*``).
- ``deepfakebench_clip``: DeepfakeBench's / DF40's CLIP detector (``training/detectors/clip_detector.py``):
  ``backbone.`` + the ``CLIPModel.vision_model`` keys, and ``head.weight`` (2, D) / ``head.bias`` (2), often under
  ``module.`` (DataParallel). Its features are ``pooler_output`` = ``post_layernorm(CLS)``, no projection.
- ``r2m_lab_detector``: an r2m_lab checkpoint (``backbone.<timm key>`` + ``head.*``).

The CLIP image projection (``visual.proj`` / ``visual_projection``, width → embedding dim) is an extra everywhere:
r2m_lab's backbone is timm's ``num_classes=0`` CLIP tower, whose features are the ``ln_post``'d class token before
that projection, which is exactly DeepfakeBench's ``pooler_output``.

OpenAI's original ``ViT-*.pt`` files are TorchScript archives: reading them runs code from the file, which r2m_lab
never does. ``python -m r2m_lab.layouts convert-torchscript IN OUT.safetensors --i-trust-this-file`` converts one
once, on the user's explicit word, into a plain state dict (``openai_clip`` layout).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from r2m_lab.atomic import atomic_path
from r2m_lab.weights import provenance

log = logging.getLogger(__name__)

LAYOUTS: dict[str, str] = {
    "timm": "timm VisionTransformer state dict",
    "openai_clip": "OpenAI CLIP / open_clip state dict (visual.*)",
    "open_clip_timm": "open_clip model with a timm trunk (visual.trunk.*)",
    "hf_clip": "Hugging Face CLIPVisionModel / CLIPModel (vision_model.*)",
    "hf_clip_vision_transformer": "Hugging Face CLIPModel.vision_model state dict (embeddings.*, encoder.*)",
    "deepfakebench_clip": "DeepfakeBench / DF40 CLIP detector (backbone.* + head.*)",
    "r2m_lab_detector": "r2m_lab detector checkpoint (backbone.<timm key> + head.*)",
}
# Layouts that carry a real/fake head besides the backbone: what stage=import accepts.
DETECTOR_LAYOUTS = ("deepfakebench_clip", "r2m_lab_detector")

# Wrappers that hold the state dict one level down (Lightning, most training scripts) and whole-model key prefixes
# (DataParallel/DDP, torch.compile, a LightningModule's `self.model`); stripped only when every key has them.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.")

# OpenAI CLIP's non-image tensors (text tower, temperature, TorchScript's scalar buffers).
OPENAI_TEXT_EXACT = {
    "token_embedding.weight": "text tower",
    "positional_embedding": "text tower",
    "ln_final.weight": "text tower",
    "ln_final.bias": "text tower",
    "text_projection": "text tower",
    "logit_scale": "image-text temperature",
    "input_resolution": "TorchScript buffer",
    "context_length": "TorchScript buffer",
    "vocab_size": "TorchScript buffer",
}
OPENAI_TEXT_PREFIXES = {"transformer.": "text tower", "text.": "text tower (open_clip HF text encoder)"}
PROJECTION_NOTE = "CLIP image projection (features are taken before it, as DeepfakeBench's pooler_output)"

MAX_NAMES = 12  # names listed per kind of problem in an error; the count says how many more


class WeightsMismatch(ValueError):
    """A weight file that does not fill the model exactly (missing, unused or mis-shaped tensors), with the names."""


class NotAStateDict(ValueError):
    """A weight file that is not a plain state dict (pickled objects, a TorchScript archive, an unknown layout)."""


@dataclass
class Converted:
    """A file's tensors in timm keys, and what the conversion did with every tensor of the file.

    sources: timm key → the file's key(s) it came from (three for a fused q/k/v), for error messages.
    extras: the file's keys the layout knowingly leaves out → why (text tower, projection...).
    unknown: the file's keys no rule of the layout recognises (reported as unused).
    head: the detector head (``weight`` (2, D), ``bias`` (2)) of a detector layout, else empty.
    prefix: what was stripped from every key (``"module."``...) and wrapper: the dict key the state sat under.
    """

    layout: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    extras: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    prefix: str = ""
    wrapper: str = ""

    def put(self, key: str, value: torch.Tensor, *source: str) -> None:
        if key in self.tensors:  # two source keys mapping to one timm key: the file is not the layout it looks like
            raise NotAStateDict(f"{source} and {self.sources[key]} both convert to {key!r} ({self.layout} layout)")
        self.tensors[key] = value
        self.sources[key] = source

    def describe(self) -> dict[str, Any]:
        """What a card records about the conversion (the layout, stripped prefix/wrapper, extras by reason)."""
        reasons: dict[str, int] = {}
        for why in self.extras.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {"layout": self.layout, "prefix": self.prefix, "wrapper": self.wrapper, "extras_ignored": reasons}


# ---------------------------------------------------------------------------------------------------- reading
def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive: a zip holding ``constants.pkl`` or a ``code/`` folder (torch.save's zips have neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a weight file and the wrapper key they sat under (``""`` for a bare state dict).

    safetensors files are read as they are; anything else goes through ``torch.load(weights_only=True)``, which
    refuses pickled objects. A TorchScript archive is refused with the one-off conversion command.
    """
    file = Path(path).expanduser()
    if file.suffix == ".safetensors":
        return load_file(str(file)), ""
    if is_torchscript(file):
        out = file.with_suffix(".safetensors")
        raise NotAStateDict(
            f"{file} is a TorchScript archive (OpenAI's original ViT-*.pt files are): reading it runs code stored in "
            "the file, which r2m_lab never does. If you trust the file, convert it once into a plain state dict:\n"
            f"  python -m r2m_lab.layouts convert-torchscript {file} {out} --i-trust-this-file\n"
            f"and set backbone.weights.path={out}"
        )
    try:
        obj = _torch_load(file)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NotAStateDict(
            f"{file} holds pickled Python objects, not only tensors, so loading it would run code from the file; "
            "r2m_lab reads weights with torch.load(weights_only=True) or safetensors only. Save a plain state dict "
            f"(torch.save(model.state_dict(), ...)) or a safetensors file instead. (torch: {first})"
        ) from err
    wrapper = ""
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            odd = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))[:MAX_NAMES]
            raise NotAStateDict(
                f"{file} is a dict with non-tensor entries {odd} and none of the wrappers {list(WRAPPER_KEYS)}: "
                "not a state dict r2m_lab can read"
            )
        wrapper = f"{wrapper}{inner}/"
        obj = obj[inner]
    if not isinstance(obj, Mapping) or not obj:
        raise NotAStateDict(f"{file} holds a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj), wrapper.rstrip("/")


def _torch_load(file: Path) -> Any:
    # Memory-mapped where the file allows it (torch.save's zip format): a 1.2 GB checkpoint is not read twice over.
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)  # the legacy (pre-1.6) format


def file_layout(path: str | Path) -> str:
    """The layout of a weight file, from its keys (safetensors: the header only; others: memory-mapped)."""
    file = Path(path).expanduser()
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        keys = list(read_state_dict(file)[0])
    return detect_layout(strip_prefix(dict.fromkeys(keys))[0])


def _all_tensors(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefix(state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove whole-model prefixes (``module.``...) shared by every key; returns the state and what was stripped."""
    stripped = ""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped += prefix
                changed = True
    return state, stripped


# ---------------------------------------------------------------------------------------------------- layouts
def detect_layout(keys: Sequence[str] | set[str]) -> str:
    """The layout of a (prefix-stripped) state dict, from marker keys; unknown layouts are refused with a sample."""
    keys = set(keys)
    markers = [
        ("deepfakebench_clip", "backbone.embeddings.class_embedding"),
        ("r2m_lab_detector", "backbone.cls_token"),
        ("hf_clip", "vision_model.embeddings.class_embedding"),
        ("hf_clip_vision_transformer", "embeddings.class_embedding"),
        ("open_clip_timm", "visual.trunk.cls_token"),
        ("openai_clip", "visual.class_embedding"),
        ("timm", "cls_token"),
    ]
    for layout, marker in markers:
        if marker in keys:
            return layout
    sample = sorted(keys)[:MAX_NAMES]
    raise NotAStateDict(
        f"unrecognised weight layout: none of the marker keys {[m for _, m in markers]} is present (first keys: "
        f"{sample}). Known layouts: {', '.join(f'{k} ({v})' for k, v in LAYOUTS.items())}"
    )


def _hf_vision(state: Mapping[str, torch.Tensor], prefix: str, out: Converted) -> set[str]:
    """Convert the ``CLIPVisionTransformer`` keys under ``prefix``; returns the keys it consumed.

    HF keeps q, k, v as three (D, D) Linear layers; timm fuses them into ``qkv`` (3D, D) in q, k, v order.
    """
    used: set[str] = set()
    qkv: dict[tuple[str, str], dict[str, str]] = {}
    simple = [
        (r"embeddings\.patch_embedding\.weight", "patch_embed.proj.weight"),
        (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
        (r"post_layernorm\.(weight|bias)", r"norm.\1"),
        (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    ]
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        used.add(key)
        if rest == "embeddings.class_embedding":  # (D,) → (1, 1, D)
            out.put("cls_token", value.reshape(1, 1, -1), key)
        elif rest == "embeddings.position_embedding.weight":  # (N+1, D) → (1, N+1, D)
            out.put("pos_embed", value.unsqueeze(0), key)
        elif rest == "embeddings.position_ids":
            # A buffer older transformers saved: must be 0..N (it only indexes the position table).
            if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise NotAStateDict(f"{key} is not 0..{value.numel() - 1}: the positions would be permuted")
            out.extras[key] = "position_ids buffer (0..N)"
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", rest):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = key
        else:
            for pattern, target in simple:
                if re.fullmatch(pattern, rest):
                    out.put(re.sub(pattern, target, rest), value, key)
                    break
            else:
                used.discard(key)
    for (layer, param), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:  # an incomplete triple: its parts are reported unused, qkv missing
            used.difference_update(parts.values())
            continue
        fused = torch.cat([state[parts[p]] for p in "qkv"], 0)
        out.put(f"blocks.{layer}.attn.qkv.{param}", fused, *(parts[p] for p in "qkv"))
    return used


def _openai_visual(state: Mapping[str, torch.Tensor], out: Converted) -> set[str]:
    """Convert OpenAI CLIP's / open_clip's ``visual.*`` image tower; returns the keys it consumed."""
    used: set[str] = set()
    block = [
        (r"ln_1\.(weight|bias)", r"norm1.\1"),
        (r"ln_2\.(weight|bias)", r"norm2.\1"),
        (r"attn\.in_proj_(weight|bias)", r"attn.qkv.\1"),  # already fused q, k, v (3D, D)
        (r"attn\.out_proj\.(weight|bias)", r"attn.proj.\1"),
        (r"mlp\.c_fc\.(weight|bias)", r"mlp.fc1.\1"),
        (r"mlp\.c_proj\.(weight|bias)", r"mlp.fc2.\1"),
    ]
    top = {"conv1.weight": "patch_embed.proj.weight"}
    for n in ("weight", "bias"):
        top[f"ln_pre.{n}"] = f"norm_pre.{n}"
        top[f"ln_post.{n}"] = f"norm.{n}"
    for key, value in state.items():
        if not key.startswith("visual."):
            continue
        rest = key[len("visual.") :]
        used.add(key)
        if rest == "class_embedding":  # (D,) → (1, 1, D)
            out.put("cls_token", value.reshape(1, 1, -1), key)
        elif rest == "positional_embedding":  # (N+1, D) → (1, N+1, D)
            out.put("pos_embed", value.unsqueeze(0), key)
        elif rest == "proj":
            out.extras[key] = PROJECTION_NOTE
        elif rest in top:
            out.put(top[rest], value, key)
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest):
            for pattern, target in block:
                if re.fullmatch(pattern, m[2]):
                    out.put(f"blocks.{m[1]}." + re.sub(pattern, target, m[2]), value, key)
                    break
            else:
                used.discard(key)
        else:
            used.discard(key)
    return used


def _openai_text_extras(keys: Sequence[str], out: Converted) -> set[str]:
    used = set()
    for key in keys:
        why = OPENAI_TEXT_EXACT.get(key) or next(
            (w for p, w in OPENAI_TEXT_PREFIXES.items() if key.startswith(p)), None
        )
        if why:
            out.extras[key] = why
            used.add(key)
    return used


def _identity(state: Mapping[str, torch.Tensor], prefix: str, out: Converted) -> set[str]:
    used = set()
    for key, value in state.items():
        if key.startswith(prefix):
            out.put(key[len(prefix) :], value, key)
            used.add(key)
    return used


def _head(state: Mapping[str, torch.Tensor], out: Converted) -> set[str]:
    for name in ("weight", "bias"):
        if f"head.{name}" in state:
            out.head[name] = state[f"head.{name}"]
    return {f"head.{n}" for n in out.head}


def convert(state: Mapping[str, torch.Tensor], layout: str | None = None) -> Converted:
    """Convert a state dict to timm keys (``layout`` detected when not given); nothing is checked against a model.

    Every key of ``state`` ends up in ``tensors`` (through ``sources``), ``extras``, ``head`` or ``unknown``.
    """
    stripped, prefix = strip_prefix(state)
    layout = layout or detect_layout(stripped)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    out = Converted(layout=layout, prefix=prefix)
    keys = list(stripped)
    if layout == "timm":
        used = _identity({k: v for k, v in stripped.items() if not k.startswith("head.")}, "", out)
        for key in keys:
            if key.startswith("head."):
                out.extras[key] = "classifier/projection head (r2m_lab builds the backbone with num_classes=0)"
                used.add(key)
    elif layout == "openai_clip":
        used = _openai_visual(stripped, out) | _openai_text_extras(keys, out)
    elif layout == "open_clip_timm":
        used = _identity(stripped, "visual.trunk.", out) | _openai_text_extras(keys, out)
        for key in keys:
            if key.startswith("visual.head."):
                out.extras[key] = PROJECTION_NOTE
                used.add(key)
    elif layout in ("hf_clip", "hf_clip_vision_transformer"):
        used = _hf_vision(stripped, "vision_model." if layout == "hf_clip" else "", out)
        for key in keys:
            if key.startswith("text_model.") or key in ("text_projection.weight", "logit_scale"):
                out.extras[key] = "text tower" if key != "logit_scale" else "image-text temperature"
                used.add(key)
            elif key == "visual_projection.weight":
                out.extras[key] = PROJECTION_NOTE
                used.add(key)
    elif layout == "deepfakebench_clip":
        used = _hf_vision(stripped, "backbone.", out) | _head(stripped, out)
    else:  # r2m_lab_detector
        used = _identity(stripped, "backbone.", out) | _head(stripped, out)
    out.unknown = sorted(prefix + k for k in keys if k not in used)
    if prefix:  # name the file's own keys in messages
        out.sources = {k: tuple(prefix + s for s in v) for k, v in out.sources.items()}
        out.extras = {prefix + k: v for k, v in out.extras.items()}
    return out


# ---------------------------------------------------------------------------------------------------- checking
def _names(items: Sequence[str]) -> str:
    items = list(items)
    more = f" (+{len(items) - MAX_NAMES} more)" if len(items) > MAX_NAMES else ""
    return ", ".join(items[:MAX_NAMES]) + more


def check(converted: Converted, expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse unless ``converted`` fills exactly the tensors of ``expected`` (a model's state dict), shapes equal.

    ``what`` names the file and the target in the message (e.g. ``"/m/ViT-L-14.bin for backbone clip_vit_l14"``).
    """
    missing = sorted(set(expected) - set(converted.tensors))
    unused = sorted({s for k in converted.tensors if k not in expected for s in converted.sources[k]})
    unused += converted.unknown
    shapes = [
        f"{'+'.join(converted.sources[k])} → {k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in sorted(converted.tensors.items())
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if not (missing or unused or shapes):
        return
    parts = [f"{what} ({converted.layout} layout) does not fit:"]
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model left unfilled: {_names(missing)}")
    if unused:
        parts.append(f"{len(unused)} tensor(s) of the file unused: {_names(unused)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_names(shapes)}")
    parts.append(
        "The backbone config (model and kwargs: width, depth, heads, patch and image size) must describe the "
        "network the file holds; r2m_lab never loads part of a file or resizes tensors."
    )
    raise WeightsMismatch("\n  ".join(parts))


def load_backbone_file(model: nn.Module, path: str | Path, what: str = "backbone") -> dict[str, Any]:
    """Fill ``model`` (a timm ViT) from a weight file in any known layout, exactly, and say where it came from.

    Returns the provenance for a card: path, bytes, sha256, layout, stripped prefix/wrapper and ignored extras. A
    detector layout's head is an extra here (``stage=import`` reads it).
    """
    file = Path(path).expanduser()
    state, wrapper = read_state_dict(file)
    converted = convert(state)
    converted.wrapper = wrapper
    for name in converted.head:
        converted.extras[f"{converted.prefix}head.{name}"] = "detector head (stage=import reads it)"
    check(converted, model.state_dict(), f"{file} for {what}")
    model.load_state_dict(converted.tensors, strict=True)  # copies into the model's dtype (fp16 files → fp32)
    info = converted.describe()
    log.info("Loaded %s from %s (%s layout, %d tensors)", what, file, converted.layout, len(converted.tensors))
    return provenance(file, info.pop("layout"), **info)


# ---------------------------------------------------------------------------------------------------- CLI
def convert_torchscript(src: str | Path, dst: str | Path) -> int:
    """Write the tensors of a TorchScript archive (e.g. OpenAI's ``ViT-L-14.pt``) as a safetensors state dict.

    This runs ``torch.jit.load``, i.e. code from the file: only for files the caller trusts (the CLI demands an
    explicit flag). Returns the number of tensors written.
    """
    module = torch.jit.load(str(src), map_location="cpu")
    # clone: safetensors refuses tensors that share storage; contiguous: it writes raw buffers
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata={"converted_from": Path(src).name, "by": "r2m_lab.layouts"})
    return len(state)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m r2m_lab.layouts inspect FILE`` / ``convert-torchscript IN OUT --i-trust-this-file``."""
    parser = argparse.ArgumentParser(prog="python -m r2m_lab.layouts", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="detect a weight file's layout and list what the conversion does")
    ins.add_argument("file")
    ts = sub.add_parser("convert-torchscript", help="TorchScript archive → safetensors state dict (runs its code)")
    ts.add_argument("src")
    ts.add_argument("dst")
    ts.add_argument("--i-trust-this-file", action="store_true", help="required: torch.jit.load runs the file's code")
    args = parser.parse_args(argv)
    out: Callable[[str], Any] = lambda s: sys.stdout.write(s + "\n")  # noqa: E731 — the CLI's only output
    if args.command == "inspect":
        state, wrapper = read_state_dict(args.file)
        c = convert(state)
        out(f"layout: {c.layout} ({LAYOUTS[c.layout]}); prefix stripped: {c.prefix!r}; wrapper: {wrapper!r}")
        out(
            f"timm tensors: {len(c.tensors)}; head: {sorted(c.head) or 'none'}; "
            f"extras: {c.describe()['extras_ignored']}"
        )
        out(f"unrecognised keys: {_names(c.unknown) if c.unknown else 'none'}")
        return 0
    if not args.i_trust_this_file:
        parser.error(
            "convert-torchscript runs code stored in the file (torch.jit.load). Pass --i-trust-this-file if it "
            "comes from a source you trust (e.g. OpenAI's CLIP release, checked against its published sha256)."
        )
    n = convert_torchscript(args.src, args.dst)
    out(f"wrote {n} tensors to {args.dst} (openai_clip layout); set backbone.weights.path={args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
