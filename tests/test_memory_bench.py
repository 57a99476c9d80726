"""The memory counter of ``make bench-memory`` (benchmarks/memory/counter.py) against real allocation, on a
small plain PyTorch model with the parts that matter (convolutions, attention, a residual added in place,
checkpointed blocks): the count on the meta device must equal the count on real CPU tensors, and both must match
the CPU allocator's own peak as ``torch.profiler`` records it."""
import contextlib

import pytest
import torch

from benchmarks.memory.counter import GB, count, memory_efficient_attention, profiler_peak, wrapped_blocks


class Block(torch.nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, ch)
        self.conv1 = torch.nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(ch, ch, 3, padding=1)
        self.qkv = torch.nn.Linear(ch, 3 * ch)
        self.proj = torch.nn.Linear(ch, ch)

    def forward(self, x):
        h = self.conv2(torch.nn.functional.silu(self.conv1(self.norm(x))))
        x = x + h
        b, c, hh, ww = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).view(b, -1, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        a = self.proj(a.transpose(1, 2).reshape(b, -1, c))
        out = x.clone()
        out += a.transpose(1, 2).reshape(b, c, hh, ww)  # a residual added in place
        return out


class Tiny(torch.nn.Module):
    def __init__(self, ch=32, blocks=2):
        super().__init__()
        self.inp = torch.nn.Conv2d(4, ch, 3, padding=1)
        self.blocks = torch.nn.ModuleList(Block(ch) for _ in range(blocks))
        self.out = torch.nn.Conv2d(ch, 4, 3, padding=1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def _iteration(net):
    def run(counter, x):
        with counter.saving():
            leaf = x.detach().requires_grad_(True)
            y = net(torch.cat([leaf, leaf]))
            loss = (y.float() ** 2).mean()
        grad, = torch.autograd.grad(loss, leaf)
        return grad
    return run


class _NoCounter:
    @contextlib.contextmanager
    def saving(self):
        yield


@pytest.mark.parametrize("low_memory", [False, True])
def test_counted_peak_matches_real_allocation(low_memory):
    torch.manual_seed(0)
    with torch.device("meta"):
        meta_net = Tiny().requires_grad_(False)
        meta_x = torch.zeros(1, 4, 64, 64)
    meta = count(_iteration(meta_net), [meta_x], [meta_net],
                 checkpoint_modules=list(meta_net.blocks) if low_memory else ())

    net = Tiny().requires_grad_(False)
    x = torch.randn(1, 4, 64, 64)
    targets = list(net.blocks) if low_memory else []
    real = count(_iteration(net), [x], [net], checkpoint_modules=targets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU attention kernel's scratch buffers are per thread
    try:
        with wrapped_blocks(net, targets), memory_efficient_attention(), torch.enable_grad():
            allocator = profiler_peak(lambda: _iteration(net)(_NoCounter(), x)) / GB
    finally:
        torch.set_num_threads(threads)

    assert meta["weights_gb"] == pytest.approx(sum(p.numel() * 4 for p in net.parameters()) / GB)
    assert meta["saved_gb"] == pytest.approx(real["saved_gb"], rel=1e-6)
    assert meta["transient_peak_gb"] == pytest.approx(real["transient_peak_gb"], rel=1e-6)
    # Every byte counted was allocated; the allocator holds at most the CPU attention kernel's scratch buffer
    # (~1 MB on one thread, allocated inside the kernel, where no operator sees it) on top.
    assert real["transient_peak_gb"] <= allocator
    assert allocator - real["transient_peak_gb"] < 1.5e6 / GB
    assert real["saved_gb"] > 0


def test_checkpointing_keeps_only_block_inputs():
    with torch.device("meta"):
        net = Tiny(blocks=4).requires_grad_(False)
        x = torch.zeros(1, 4, 32, 32)
    full = count(_iteration(net), [x], [net])
    low = count(_iteration(net), [x], [net], checkpoint_modules=list(net.blocks))
    assert low["saved_gb"] < 0.5 * full["saved_gb"]
    assert low["transient_peak_gb"] < full["transient_peak_gb"]
