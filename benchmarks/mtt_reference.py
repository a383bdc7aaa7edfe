"""A re-creation of the reference MTT inner loop, for timing ``dpd`` against it.

Written for this benchmark from the structure of the public MTT code
(GeorgeCazenavette/mtt-distillation: ``distill.py`` and ``reparam_module.py``); no code was
copied. What is kept, because it decides speed and memory:

* The student is a ``ReparamModule``-style wrapper: the network's parameters are removed
  from its modules and replaced by plain-attribute *views* into one flat vector; a forward
  pass with another flat vector splits it, ``view``s each piece to its layer's shape, sets the
  views as module attributes, runs the module and puts the old views back. (dpd uses
  ``torch.func.functional_call`` on an unmodified module instead.)
* A fresh student network is built and wrapped every iteration, as MTT does, with its instance
  layers as MTT has them: ``nn.Conv2d``, ``nn.GroupNorm(C, C)`` (PyTorch differentiating
  ``F.group_norm`` itself) and ``nn.AvgPool2d``, not dpd's (``dpd_cli.models.conv``, ``.norm``).
* The expert trajectory is held as per-layer CPU tensors (MTT's replay buffer) and
  concatenated to the device every iteration.
* The unroll keeps every student parameter vector in ``student_params`` and back-propagates
  once through all N steps (``create_graph=True``): MTT's "full" memory profile.
* Each step indexes the synthetic set with a random permutation chunk, even when the batch
  is the whole set (MTT's ``indices_chunks``).
* Loss: ``mse_loss(..., reduction="sum")`` of end vs target over that of start vs target
  (each divided by the number of parameters, which cancels); ``grand_loss.backward()``;
  ``torch.optim.SGD(momentum=0.5)`` steps on the images and on the learnable lr.

Deliberate difference: the augmentation is ``dpd_cli.core.augment.dsa`` with the same per-step
seeds dpd uses, so both sides do identical augmentation work and the comparison isolates
the unroll machinery. With ``identity_order=True``, no pruning and the same seeds, one
iteration gives the same loss and image gradient as ``dpd``'s ``meta_gradient`` (full);
``python benchmarks/mtt_reference.py`` checks that in float64.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from dpd_cli.core.augment import dsa
from dpd_cli.models import ModelSpec, build_model

__all__ = ["ReparamModule", "MTTReference", "mtt_network", "plain_layers"]


def plain_layers(net: nn.Module) -> nn.Module:
    """``net`` with PyTorch's own layers where dpd has its own: every instance norm an
    ``nn.GroupNorm(C, C)`` and every convolution an ``nn.Conv2d`` holding the same parameters, every
    2x2 average pool an ``nn.AvgPool2d``."""
    from dpd_cli.models.conv import Conv2d
    from dpd_cli.models.norm import AvgPool2, InstanceNorm

    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, InstanceNorm):
                plain = nn.GroupNorm(child.num_channels, child.num_channels, eps=child.eps, affine=child.affine)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain.to(next(child.parameters(), torch.empty(0)).device))
            elif isinstance(child, AvgPool2):
                setattr(parent, name, nn.AvgPool2d(2, 2))
            elif isinstance(child, Conv2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.padding, child.dilation, child.groups, child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain.to(child.weight.device))
    left = [type(m).__name__ for m in net.modules() if isinstance(m, (Conv2d, AvgPool2, InstanceNorm))]
    if left:  # a dpd layer added later and not mapped here would silently speed up the baseline
        raise TypeError(f"plain_layers left dpd layers in the network: {left}")
    return net


def mtt_network(spec: ModelSpec) -> nn.Module:
    """The network as MTT builds it (same initialisation as ``build_model``; ``nn.Conv2d``, ``nn.GroupNorm``, ``nn.AvgPool2d``)."""
    return plain_layers(build_model(spec))


class ReparamModule(nn.Module):
    """Runs ``module`` with its parameters taken from a flat vector (views as plain attributes)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        owners, names, shapes, numels, tensors = [], [], [], [], []
        for _, sub in module.named_modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                owners.append(sub)
                names.append(name)
                shapes.append(p.shape)
                numels.append(p.numel())
                tensors.append(p.detach())
        self._slots = list(zip(owners, names))
        self._shapes = shapes
        self._numels = numels
        self.flat_param = nn.Parameter(torch.cat([t.reshape(-1) for t in tensors]))
        for owner, name in self._slots:
            delattr(owner, name)  # no longer a registered parameter ...
        self._set_views(self.flat_param)  # ... but a plain attribute holding a view

    def _set_views(self, flat: torch.Tensor) -> list:
        old = [getattr(owner, name, None) for owner, name in self._slots]
        pieces = flat.split(self._numels)
        for (owner, name), piece, shape in zip(self._slots, pieces, self._shapes):
            setattr(owner, name, piece.view(shape))
        return old

    def forward(self, x: torch.Tensor, flat_param: torch.Tensor | None = None) -> torch.Tensor:
        flat = self.flat_param if flat_param is None else torch.squeeze(flat_param)
        saved = self._set_views(flat)
        try:
            return self.module(x)
        finally:
            for (owner, name), v in zip(self._slots, saved):
                setattr(owner, name, v)


def _as_buffer_entry(flat: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    """A flat vector as MTT's replay buffer stores one epoch: per-layer CPU tensors."""
    shapes = [p.shape for p in build_model(spec).parameters()]
    out, offset = [], 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        out.append(flat[offset : offset + n].detach().cpu().reshape(s).clone())
        offset += n
    return out


class MTTReference:
    """State of a reference MTT distillation (images, lr, their optimisers) and one iteration.

    Args:
        spec: The student network.
        images: Initial synthetic images ``(n, C, H, W)`` on the device.
        labels: ``(n,)`` on the device.
        lr_teacher, lr_img, lr_lr: alpha_0 and the two SGD learning rates (momentum 0.5).
        batch_syn: Images per student step (``None`` = all).
    """

    def __init__(self, spec: ModelSpec, images, labels, lr_teacher: float, lr_img: float, lr_lr: float, batch_syn: int | None = None):
        self.spec = spec
        self.device = images.device
        self.image_syn = images.detach().clone().requires_grad_(True)
        self.label_syn = labels
        self.syn_lr = torch.tensor(lr_teacher, device=self.device, dtype=images.dtype).requires_grad_(True)
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=lr_img, momentum=0.5)
        self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=lr_lr, momentum=0.5)
        self.batch_syn = batch_syn or len(images)

    @staticmethod
    def buffer_entry(flat: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
        return _as_buffer_entry(flat, spec)

    def iteration(self, starting_params: list[torch.Tensor], target_params: list[torch.Tensor], seeds: list[int | None],
                  identity_order: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
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

        syn_images = self.image_syn
        y_hat = self.label_syn
        indices_chunks: list[torch.Tensor] = []
        for seed in seeds:
            if not indices_chunks:
                order = torch.arange(len(syn_images)) if identity_order else torch.randperm(len(syn_images))
                indices_chunks = list(torch.split(order, self.batch_syn))
            these = indices_chunks.pop()
            x = syn_images[these]
            y = y_hat[these]
            if seed is not None:
                x = dsa(x, seed)
            out = student_net(x, flat_param=student_params[-1])
            ce = F.cross_entropy(out, y)
            grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - self.syn_lr * grad)

        param_loss = torch.tensor(0.0, device=dev, dtype=start.dtype)
        param_dist = torch.tensor(0.0, device=dev, dtype=start.dtype)
        param_loss += F.mse_loss(student_params[-1], target, reduction="sum")
        param_dist += F.mse_loss(start, target, reduction="sum")
        param_loss /= num_params
        param_dist /= num_params
        param_loss /= param_dist
        grand_loss = param_loss

        self.optimizer_img.zero_grad()
        self.optimizer_lr.zero_grad()
        grand_loss.backward()
        self.optimizer_img.step()
        self.optimizer_lr.step()
        del student_params
        return grand_loss.detach()


def check_against_dpd(device: str = "cpu", n_steps: int = 3, rtol: float = 1e-9) -> dict:
    """One iteration of the reference and of dpd's ``meta_gradient`` (full, rho = 0), float64: same loss and dL/dX?"""
    from dpd_cli.core import matching
    from dpd_cli.models import FlatModel

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
    plan = matching.StepPlan([None] * n_steps, list(seeds))
    res = matching.meta_gradient(fm, images, labels, lr, start, target, plan, "full")  # no mask: MTT

    ref = MTTReference(spec, images, labels, 0.01, lr_img=1.0, lr_lr=1.0)
    loss = ref.iteration(_as_buffer_entry(start, spec), _as_buffer_entry(target, spec), seeds, identity_order=True, dtype=torch.float64)
    gx = ref.image_syn.grad
    ga = ref.syn_lr.grad
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))  # noqa: E731
    out = {"loss_rel": rel(loss, res.loss), "grad_images_rel": rel(gx, res.grad_images), "grad_lr_rel": rel(ga, res.grad_lr)}
    out["ok"] = all(v <= rtol for v in out.values())
    return out


if __name__ == "__main__":
    import json
    import sys

    result = check_against_dpd(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)
