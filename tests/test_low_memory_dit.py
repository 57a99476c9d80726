"""``low_memory`` on the transformer (DiT) families and SDXL: SD3's joint blocks, Flux's double- and single-stream
blocks and SDXL's ResBlocks / SpatialTransformers are checkpointed for the guided run only, give the same guided output, and — where ComfyUI casts the weights layer
by layer (fp8 weights via UNETLoader's weight_dtype, which on the CPU runs with manual cast to fp32) — keep no cast
weight among the tensors saved for the backward pass.

The tiny SD3 / Flux files are those of test_model_families.py (real file formats, stock loaders), called as the
executor calls the nodes. SD3 and Flux do not exist in the 2024-03 host, whose UNETLoader has no weight_dtype: there
the tests skip with a message; they run on v0.3.64 (COMFYUI_PATH=…).
"""
from __future__ import annotations


import pytest
import torch

import prompts
from test_model_families import FAMILIES, ensure_files, family_folders, host_label

SIZE = 32  # pixels: latent 4×4, 2×2 patches
BLOCKS = {"sd3": ("JointBlock",), "flux": ("DoubleStreamBlock", "SingleStreamBlock"),
          "sdxl": ("ResBlock", "SpatialTransformer")}


class _InplaceBlock(torch.nn.Module):
    """The pattern of Flux's double-stream block on its text stream: ``txt += f(norm(txt))`` twice, so the first
    norm's saved input is changed by the first add when the block is run again in the backward pass."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8, elementwise_affine=False)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, vec):
        x += self.lin(self.norm(x)) * vec
        x += self.lin(self.norm(x)) * vec
        return x


def test_blocks_adding_in_place_to_their_inputs_give_the_same_gradient(host):
    """Checkpointing blocks that add residuals in place to their own (saved) inputs, under the denoiser's
    saved-tensor hooks as on Flux: the gradient equals the one without checkpointing. Plain checkpointing of such
    blocks gives a wrong gradient (checked too, so the test can fail)."""
    from headless.host import pack_module
    gc_ = pack_module("nodes.guided_calls")
    weights = pack_module("nodes.autograd_weights")
    torch.manual_seed(0)
    stem = torch.nn.Linear(8, 8).requires_grad_(False)
    blocks = torch.nn.ModuleList([_InplaceBlock() for _ in range(3)]).requires_grad_(False)

    def grad(copy_saved=None):
        x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        vec = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(2))
        targets = [] if copy_saved is None else [(b, copy_saved) for b in blocks]
        with gc_.low_memory(targets):
            with torch.autograd.graph.saved_tensors_hooks(weights._pack_saved, weights._unpack_saved):
                h = stem(x)
                for b in blocks:
                    h = b(h, vec)
            (h ** 2).sum().backward()
        return x.grad

    reference = grad()
    torch.testing.assert_close(grad(copy_saved=True), reference)
    try:
        plain = grad(copy_saved=False)
    except RuntimeError:  # torch may also notice the changed recomputation
        plain = None
    assert plain is None or not torch.allclose(plain, reference, rtol=1e-3, atol=1e-3)
    assert not any("forward" in b.__dict__ for b in blocks)


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def family(request, host):
    import comfy.supported_models
    import nodes

    fam = FAMILIES[request.param]
    missing = [name for name in fam.requires if not hasattr(comfy.supported_models, name)]
    if not missing and "weight_dtype" not in nodes.UNETLoader.INPUT_TYPES()["required"]:
        missing = ["UNETLoader weight_dtype"]
    if missing:
        pytest.skip(f"{fam.name}: {host_label(host)} has no {', '.join(missing)} model support (comfy."
                    f"supported_models.{missing[0]}); low_memory on this family is tested on ComfyUI v0.3.64 "
                    f"(COMFYUI_PATH=…)")
    names = ensure_files(fam)
    # SD3's checkpoint is also read by UNETLoader (the diffusion model only), which offers the fp8 weight dtypes.
    extra = [("checkpoints", "diffusion_models")] * ("checkpoints" in names)
    with family_folders(host, fam, extra):
        yield fam, names


def load(fam, names, weight_dtype: str):
    """(model, vae, positive, negative) from the stock loaders; the model by UNETLoader with ``weight_dtype``."""
    import nodes
    with torch.inference_mode():
        if "checkpoints" in names:
            _, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(names["checkpoints"])[:3]
            unet_name = names["checkpoints"]
        else:
            clip = nodes.CLIPLoader().load_clip(names["text_encoders"], "sd3")[0]
            vae = nodes.VAELoader().load_vae(names["vae"])[0]
            unet_name = names["diffusion_models"]
        model = nodes.UNETLoader().load_unet(unet_name, weight_dtype)[0]
        positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
        negative = nodes.ConditioningZeroOut().zero_out(positive)[0]
        if fam.flux_guidance is not None:  # what FluxGuidance does
            import node_helpers
            positive = node_helpers.conditioning_set_values(positive, {"guidance": fam.flux_guidance})
    return model, vae, positive, negative


def blocks_of(model, fam) -> list:
    net = model.model.diffusion_model
    return [m for m in net.modules() if type(m).__name__ in BLOCKS[fam.name]]


def block_weight_shapes(model, fam) -> set:
    """Shapes (and transposes) of the blocks' weight matrices that no matrix outside the blocks has."""
    inside = {id(p) for b in blocks_of(model, fam) for p in b.parameters()}
    shapes, outside = set(), set()
    for p in model.model.diffusion_model.parameters():
        if p.dim() == 2:
            (shapes if id(p) in inside else outside).update({tuple(p.shape), tuple(p.shape[::-1])})
    return shapes - outside


def guided(host, fam, loaded, low_memory: bool, monkeypatch=None):
    """One guided KSampler run (2 steps, forward guidance through the model). Returns (latent, stats): the grad-mode
    calls of each block's first layer (a recomputation calls it again), whether the blocks were wrapped while they
    ran, and the shapes of all tensors saved for backward during the run."""
    from headless.host import pack_module
    model, vae, positive, negative = loaded
    stats = {"calls": 0, "wrapped": set(), "saved": []}
    handles = []
    for block in blocks_of(model, fam):
        first = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
        handles.append(first.register_forward_pre_hook(
            lambda m, a: stats.__setitem__("calls", stats["calls"] + torch.is_grad_enabled())))
        handles.append(block.register_forward_pre_hook(
            lambda m, a: stats["wrapped"].add("forward" in m.__dict__) if torch.is_grad_enabled() else None))

    def record(t):
        stats["saved"].append(tuple(t.shape))
        return t

    if monkeypatch is not None:  # the denoiser's own saved-tensor hooks (Flux blocks add residuals in place)
        weights = pack_module("nodes.autograd_weights")
        pack, targeted = weights._pack_saved, weights._InplaceTargets.pack
        monkeypatch.setattr(weights, "_pack_saved", lambda t: pack(record(t)))
        monkeypatch.setattr(weights._InplaceTargets, "pack", lambda self, t: targeted(self, record(t)))
    img = torch.zeros(1, SIZE, SIZE, 3)
    img[:, :, : SIZE // 2] = 1.0
    channels = 4 if fam.name == "sdxl" else 16
    latent = {"samples": torch.zeros(1, channels, SIZE // 8, SIZE // 8)}
    knobs = {**prompts.KNOBS, "forward_strength": 2.0, "strength_mode": "normalized", "low_memory": low_memory}
    try:
        with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t), torch.inference_mode():
            guidance = host.node_types["UniversalGuidanceImage"]().build(img, "l2", 100.0, 0.0, 1.0)[0]
            out = host.node_types["UniversalGuidanceKSampler"]().sample(
                model, positive, negative, latent, vae, guidance, fam.seed, 2, fam.cfg, fam.scheduler, 1.0,
                **knobs)
    finally:
        for h in handles:
            h.remove()
        if monkeypatch is not None:
            monkeypatch.undo()
    return out[0]["samples"], stats


def test_low_memory_checkpoints_the_blocks_with_the_same_result(host, family):
    fam, names = family
    if fam.name == "flux":  # the fp8 test below checks the same on Flux (wrapped, recomputed, same output)
        pytest.skip("Flux is covered by test_low_memory_keeps_no_cast_weight_for_backward (keeps CI time down)")
    loaded = load(fam, names, "default")
    a, off = guided(host, fam, loaded, low_memory=False)
    b, on = guided(host, fam, loaded, low_memory=True)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert off["calls"] > 0 and off["wrapped"] == {False}
    # every block wrapped during the run, each guided forward recomputed once in the backward pass
    assert on["wrapped"] == {True} and on["calls"] == 2 * off["calls"], (on["calls"], off["calls"])
    model = loaded[0]
    assert not any("forward" in m.__dict__ for m in model.model.diffusion_model.modules())  # no leftover wrappers


def test_low_memory_keeps_no_cast_weight_for_backward(host, family, monkeypatch):
    """fp8 weights cast to fp32 layer by layer (ComfyUI's manual cast): without low_memory the cast weights are
    saved for backward (one full-precision copy of the model, on the device); with it, none is."""
    fam, names = family
    loaded = load(fam, names, "fp8_e4m3fn")
    model = loaded[0]
    assert model.model.manual_cast_dtype is not None, "this host does not cast fp8 weights per layer on the CPU"
    assert any(getattr(m, "comfy_cast_weights", False) for m in model.model.diffusion_model.modules())
    shapes = block_weight_shapes(model, fam)
    assert shapes
    a, off = guided(host, fam, loaded, low_memory=False, monkeypatch=monkeypatch)
    b, on = guided(host, fam, loaded, low_memory=True, monkeypatch=monkeypatch)
    kept_off = [s for s in off["saved"] if s in shapes]
    kept_on = [s for s in on["saved"] if s in shapes]
    assert kept_off, "without low_memory the cast block weights should be among the saved tensors"
    assert not kept_on, f"weight-sized tensors saved for backward with low_memory: {sorted(set(kept_on))}"
    assert on["wrapped"] == {True} and on["calls"] == 2 * off["calls"]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert not any("forward" in m.__dict__ for m in model.model.diffusion_model.modules())
