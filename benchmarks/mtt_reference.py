#!/usr/bin/env python3
"""A re-creation of the reference MTT inner loop: the speed baseline of ``speed.py``.

    python benchmarks/mtt_reference.py [--device cuda]   # one iteration vs dpd's meta_gradient, float64

Written from the structure of the public MTT code (GeorgeCazenavette/mtt-distillation: ``distill.py``,
``reparam_module.py``); no code copied. Kept, because it decides speed and memory: a
``ReparamModule``-style student (parameters swapped in as views of one flat vector), a fresh
``mtt_network`` of PyTorch's layers every iteration, the expert trajectory as per-layer CPU tensors,
one backward through all N steps (``create_graph=True``), random-permutation chunks per step, the
summed-MSE ratio loss and ``SGD(momentum=0.5)`` on images and lr. Deliberate difference: dpd's
``dsa`` with dpd's seeds, so that both sides augment alike; with ``identity_order=True``, no pruning
and the same seeds, one iteration gives dpd's loss and gradients (``check_against_dpd``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch
import torch.nn.functional as F
from torch import nn

from dpd_cli.core import matching
from dpd_cli.core.augment import dsa
from dpd_cli.models import FlatModel, ModelSpec, build_model

__all__ = ["ReparamModule", "MTTReference", "MTTConvNet", "mtt_network", "buffer_entry", "check_against_dpd"]


class MTTConvNet(nn.Module):
    """MTT's ConvNet (instance norm, average pooling) of PyTorch's own layers, named as dpd's ConvNet."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.name != "convnet" or spec.norm != "instance" or spec.pool != "avg":
            raise ValueError(f"the reference builds MTT's ConvNet (instance norm, avg pool), not {spec}")
        c, (h, w) = spec.channels, spec.image_size
        for d in range(spec.depth):
            pad = 3 if (d == 0 and c == 1 and (h, w) == (28, 28)) else 1  # MTT pads MNIST-sized images to 32
            self.add_module(f"conv{d + 1}", nn.Conv2d(c, spec.width, 3, padding=pad))
            self.add_module(f"norm{d + 1}", nn.GroupNorm(spec.width, spec.width, affine=True))
            self.add_module(f"act{d + 1}", nn.ReLU(inplace=True))
            self.add_module(f"pool{d + 1}", nn.AvgPool2d(2))
            h, w, c = (h + 2 * pad - 2) // 2, (w + 2 * pad - 2) // 2, spec.width
        self.depth = spec.depth
        self.fc = nn.Linear(c * h * w, spec.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in range(1, self.depth + 1):
            x = getattr(self, f"pool{d}")(
                getattr(self, f"act{d}")(getattr(self, f"norm{d}")(getattr(self, f"conv{d}")(x)))
            )
        return self.fc(x.flatten(1))


def mtt_network(spec: ModelSpec) -> MTTConvNet:
    """MTT's network with ``build_model``'s initialisation (the same random draws, the same values)."""
    net = MTTConvNet(spec)
    net.load_state_dict(build_model(spec).state_dict())
    return net


class ReparamModule(nn.Module):
    """Runs ``module`` with its parameters taken from a flat vector (views as plain attributes)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.slots, self.shapes, tensors = [], [], []
        for _, sub in module.named_modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                self.slots.append((sub, name))
                self.shapes.append(p.shape)
                tensors.append(p.detach())
        self.numels = [t.numel() for t in tensors]
        self.flat_param = nn.Parameter(torch.cat([t.reshape(-1) for t in tensors]))
        for owner, name in self.slots:
            delattr(owner, name)  # no longer a registered parameter ...
        self.set_views(self.flat_param)  # ... but a plain attribute holding a view

    def set_views(self, flat: torch.Tensor) -> list:
        old = [getattr(owner, name, None) for owner, name in self.slots]
        for (owner, name), piece, shape in zip(self.slots, flat.split(self.numels), self.shapes):
            setattr(owner, name, piece.view(shape))
        return old

    def forward(self, x: torch.Tensor, flat_param: torch.Tensor | None = None) -> torch.Tensor:
        saved = self.set_views(self.flat_param if flat_param is None else torch.squeeze(flat_param))
        try:
            return self.module(x)
        finally:
            for (owner, name), v in zip(self.slots, saved):
                setattr(owner, name, v)


def buffer_entry(flat: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    """A flat vector as MTT's replay buffer stores one epoch: per-layer CPU tensors."""
    shapes = [p.shape for p in MTTConvNet(spec).parameters()]
    pieces = flat.detach().cpu().split([s.numel() for s in shapes])
    return [p.reshape(s).clone() for p, s in zip(pieces, shapes)]


class MTTReference:
    """State of a reference MTT distillation (images, lr, their optimisers) and one iteration."""

    def __init__(
        self,
        spec: ModelSpec,
        images,
        labels,
        lr_teacher: float,
        lr_img: float,
        lr_lr: float,
        batch_syn: int | None = None,
    ):
        self.spec, self.device = spec, images.device
        self.image_syn = images.detach().clone().requires_grad_(True)
        self.label_syn = labels
        self.syn_lr = torch.tensor(lr_teacher, device=self.device, dtype=images.dtype).requires_grad_(True)
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=lr_img, momentum=0.5)
        self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=lr_lr, momentum=0.5)
        self.batch_syn = batch_syn or len(images)

    def iteration(
        self,
        starting_params: list[torch.Tensor],
        target_params: list[torch.Tensor],
        seeds: list[int | None],
        identity_order: bool = False,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """One MTT iteration: unroll ``len(seeds)`` steps, match, backward, step. Returns the loss (detached)."""
        dev = self.device
        student_net = mtt_network(self.spec).to(dev)  # a fresh network every iteration, as MTT
        if dtype is not None:
            student_net = student_net.to(dtype)
        student_net = ReparamModule(student_net)
        student_net.train()
        num_params = sum(p.numel() for p in student_net.parameters())
        target = torch.cat([p.data.to(dev).reshape(-1) for p in target_params], 0)
        student_params = [torch.cat([p.data.to(dev).reshape(-1) for p in starting_params], 0).requires_grad_(True)]
        start = torch.cat([p.data.to(dev).reshape(-1) for p in starting_params], 0)
        indices_chunks: list[torch.Tensor] = []
        for seed in seeds:
            if not indices_chunks:
                n = len(self.image_syn)
                indices_chunks = list(
                    torch.split(torch.arange(n) if identity_order else torch.randperm(n), self.batch_syn)
                )
            these = indices_chunks.pop()
            x, y = self.image_syn[these], self.label_syn[these]
            if seed is not None:
                x = dsa(x, seed)
            ce = F.cross_entropy(student_net(x, flat_param=student_params[-1]), y)
            grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - self.syn_lr * grad)
        param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
        param_dist = F.mse_loss(start, target, reduction="sum") / num_params
        grand_loss = param_loss / param_dist
        self.optimizer_img.zero_grad()
        self.optimizer_lr.zero_grad()
        grand_loss.backward()
        self.optimizer_img.step()
        self.optimizer_lr.step()
        return grand_loss.detach()


def check_against_dpd(device: str = "cpu", n_steps: int = 3, rtol: float = 1e-9) -> dict:
    """One iteration of the reference and of dpd's ``meta_gradient`` (full, rho 0), float64: relative differences."""
    dev = torch.device(device)
    spec = ModelSpec("convnet", 3, (16, 16), 4, width=8, depth=2)
    torch.manual_seed(0)
    fm = FlatModel(build_model(spec).to(dev).double())
    start = fm.flatten()
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(8, 3, 16, 16, device=dev, dtype=torch.float64)
    labels = torch.arange(4, device=dev).repeat_interleave(2)
    rng = random.Random(1)
    seeds = [rng.getrandbits(63) for _ in range(n_steps)]
    lr = torch.tensor(0.01, device=dev, dtype=torch.float64)
    res = matching.meta_gradient(
        fm, images, labels, lr, start, target, matching.StepPlan([None] * n_steps, seeds), "full"
    )
    ref = MTTReference(spec, images, labels, 0.01, lr_img=1.0, lr_lr=1.0)
    loss = ref.iteration(
        buffer_entry(start, spec), buffer_entry(target, spec), seeds, identity_order=True, dtype=torch.float64
    )

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))

    out = {
        "loss_rel": rel(loss, res.loss),
        "grad_images_rel": rel(ref.image_syn.grad, res.grad_images),
        "grad_lr_rel": rel(ref.syn_lr.grad, res.grad_lr),
    }
    out["ok"] = all(v <= rtol for v in out.values())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="unrolled steps of the check (default 3)")
    p.add_argument("--smoke", action="store_true", help="the check with 2 steps")
    a = p.parse_args(argv)
    result = check_against_dpd(a.device, 2 if a.smoke else a.steps)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
