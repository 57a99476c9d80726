"""What the self-guidance test files share: the tiny SD1.5 checkpoint loaded once per module by the stock loader,
CLIP Text Encode, and a node of the pack, all called as the executor calls them (inference mode)."""
from __future__ import annotations

import pytest
import torch

from conftest import CHECKPOINT


@pytest.fixture(scope="module")
def sd(host):
    import nodes
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
    return model, clip, vae


def encode(clip, text):
    import nodes
    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0]


def node(host, name):
    return host.node_types[name]()
