"""Config helpers every stage uses: plain copies of config nodes and stable fingerprints of them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import OmegaConf


def plain(node: Any) -> Any:
    """A resolved, plain-Python copy of a config node (dicts/lists), or the value itself."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def fingerprint(obj: Any, length: int = 10) -> str:
    """A short stable hash of a JSON-able object (config nodes are resolved first)."""
    text = json.dumps(plain(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
