"""GORP's pieces (CONTINUAL.md): the stacked adapter pairs of earlier tasks, the memory basis that keeps later
updates off the directions earlier tasks used, the projected Adam of the full-rank weights, and the metrics.

A basis is never turned into a dense projector: removing its span from X is U (U^T X), O(d k c) for a d x c
matrix, where U U^T would be d x d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SKETCH_COLUMNS = 256  # the most columns a task's gradient summary keeps (its top singular directions)


class FrozenPairs(nn.Module):
    """base(x) + scaling * B (A x), where A (R x d_in) and B (d_out x R) stack the adapter pairs of the tasks
    learnt so far, r rows and columns per task: sum_j B_j A_j x with one scaling for every pair."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.register_buffer("A", torch.zeros(0, in_features))
        self.register_buffer("B", torch.zeros(out_features, 0))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.A.shape[0] == 0:
            return out
        return out + (self.scaling * F.linear(F.linear(x.to(self.A.dtype), self.A), self.B)).to(out.dtype)

    def append(self, A: Tensor, B: Tensor) -> None:
        self.A = torch.cat([self.A, A.detach().float()])
        self.B = torch.cat([self.B, B.detach().float()], dim=1)


class Basis:
    """Orthonormal columns U (d x k) spanning the directions earlier tasks used; k grows after each task."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.U = torch.zeros(dim, 0, device=device)

    def remove(self, X: Tensor) -> Tensor:
        """X (d x c) without its component in span(U): X - U (U^T X)."""
        if self.U.shape[1] == 0:
            return X
        U = self.U.to(X.dtype)
        return X - U @ (U.T @ X)

    def grow(self, summary: GradientSummary, threshold: float) -> int:
        """Append the fewest new directions (orthogonal to U) that bring the share of the summary's energy
        captured by span(U) to `threshold`; returns how many were added."""
        Z = summary.Z.to(self.U.device)
        total = summary.energy
        if total == 0:
            return 0
        captured = (self.U.T @ Z).square().sum().item() if self.U.shape[1] else 0.0
        need = threshold * total - captured
        if need <= 0:
            return 0
        left, singular, _ = torch.linalg.svd(self.remove(Z), full_matrices=False)
        energies = singular.square().cumsum(0)
        reachable = int((singular > singular.max() * 1e-6).sum()) if len(singular) else 0
        added = min(int((energies < need).sum()) + 1, reachable)
        if added:
            Q, _ = torch.linalg.qr(self.remove(left[:, :added]))  # exactly orthogonal to U despite rounding
            self.U = torch.cat([self.U, Q], dim=1)
        return added


class GradientSummary:
    """A task's gradients over the whole task, as columns Z (d x c) with Z Z^T = sum of G G^T: every step's
    columns are kept until there are 2 x SKETCH_COLUMNS, then Z is cut to its top SKETCH_COLUMNS singular
    directions (their energy kept, the tail's counted as captured by nothing), so memory stays d x 512
    for any task length and the summary is exact while the task is short."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.Z = torch.zeros(dim, 0, device=device)
        self.dropped = 0.0

    @property
    def energy(self) -> float:
        return self.Z.square().sum().item() + self.dropped

    def add(self, columns: Tensor) -> None:
        self.Z = torch.cat([self.Z, columns.detach().float()], dim=1)
        if self.Z.shape[1] > 2 * SKETCH_COLUMNS:
            left, singular, _ = torch.linalg.svd(self.Z, full_matrices=False)
            self.dropped += singular[SKETCH_COLUMNS:].square().sum().item()
            self.Z = left[:, :SKETCH_COLUMNS] * singular[:SKETCH_COLUMNS]


class ProjectedAdam:
    """GaLore-style Adam for full-rank weights W (m x n) whose gradients avoid a memory basis U (m x k).

    Every `gap` steps P (r x n) becomes the top-r right singular vectors of the gradient G; Adam runs on
    R = G P^T (m x r) after removing span(U) from it; the step N (m x r), with span(U) removed again
    (Adam's per-entry scaling would otherwise bring some back), is applied as W -= lr * scale * N P.
    Written here because GaLore's optimizers (galore-torch) have no place between projecting the gradient
    and updating the moments, which is where the memory basis acts. R before the memory projection feeds
    the task's `GradientSummary`, from which the basis grows after the task.
    """

    def __init__(self, params: dict[str, nn.Parameter], memory: dict[str, Basis] | None, lr: float, rank: int,
                 scale: float, gap: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.memory = params, memory
        self.lr, self.rank, self.scale, self.gap, self.betas, self.eps = lr, rank, scale, gap, betas, eps
        self.steps = 0
        self.state: dict[str, dict[str, Tensor]] = {}
        self.summaries = {name: GradientSummary(p.shape[0], p.device) for name, p in params.items()}

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0) -> None:
        b1, b2 = self.betas
        self.steps += 1
        for name, p in self.params.items():
            if p.grad is None:
                continue
            G = p.grad.float()
            state = self.state.setdefault(name, {})
            if (self.steps - 1) % self.gap == 0:
                state["P"] = torch.linalg.svd(G, full_matrices=False)[2][:min(self.rank, min(G.shape))]
            P = state["P"]
            R = G @ P.T
            basis = self.memory.get(name) if self.memory else None
            if basis is not None:  # without a memory (sequential fine-tuning) nothing grows from the summary
                self.summaries[name].add(R)
                R = basis.remove(R)
            m = state.setdefault("m", torch.zeros_like(R)).mul_(b1).add_(R, alpha=1 - b1)
            v = state.setdefault("v", torch.zeros_like(R)).mul_(b2).addcmul_(R, R, value=1 - b2)
            N = (m / (1 - b1 ** self.steps)) / ((v / (1 - b2 ** self.steps)).sqrt() + self.eps)
            if basis is not None:
                N = basis.remove(N)
            p.add_((N @ P).to(p.dtype), alpha=-self.lr * lr_factor * self.scale)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def average_accuracy(matrix: list[list[float]]) -> float:
    """AA: the mean over tasks of the last row (accuracy of each task after the whole sequence)."""
    return sum(matrix[-1]) / len(matrix[-1])


def backward_transfer(matrix: list[list[float]]) -> float:
    """BWT: mean over i < T of a[T][i] - a[i][i] (negative: forgetting); 0 after a single task. `matrix[t][i]`
    is task i's accuracy after training task t; row t holds at least tasks 0..t."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return sum(matrix[last][i] - matrix[i][i] for i in range(last)) / last


def kaiming_rows(rows: int, columns: int, device) -> Tensor:
    """A new adapter factor A as peft initialises it (Kaiming-uniform, a = sqrt(5))."""
    return nn.init.kaiming_uniform_(torch.empty(rows, columns, device=device), a=math.sqrt(5))
