"""The min-min PGD step on delta (pure tensor math: no IO, no config, no accelerate).

Shapes: B batch, C channels, H/W canvas side. All values are in 1/255 pixel units, so
with an integer step size delta stays integer-valued: exactly what int8 state stores.
"""

from __future__ import annotations

import torch


def project(delta_BCHW: torch.Tensor, canvas_BCHW: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Clip delta to the L-inf ball |delta| <= epsilon and canvas + delta to [0, 255]."""
    delta_BCHW = delta_BCHW.clamp(-epsilon, epsilon)
    return (canvas_BCHW + delta_BCHW).clamp(0, 255) - canvas_BCHW


def pgd_step(delta_BCHW: torch.Tensor, grad_BCHW: torch.Tensor, canvas_BCHW: torch.Tensor, epsilon: float, step_size: float) -> torch.Tensor:
    """One error-minimising step: move against the gradient's sign, then project."""
    return project(delta_BCHW - step_size * grad_BCHW.sign(), canvas_BCHW, epsilon)


def minimize_delta(loss_fn, delta_BCHW: torch.Tensor, canvas_BCHW: torch.Tensor, steps: int, epsilon: float, step_size: float) -> torch.Tensor:
    """``steps`` PGD steps that lower ``loss_fn(canvas + delta, step)`` (a scalar).

    ``loss_fn`` receives the pixel tensor and the step index (PGD shuffles captions anew at
    every step). Returns the new delta, detached.
    """
    delta = delta_BCHW.detach().clone()
    for step in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(canvas_BCHW + delta, step)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = pgd_step(delta.detach(), grad, canvas_BCHW, epsilon, step_size)
    return delta.detach()
