"""Aggregated low-rank updates on a UNet's linear layers:

    ΔW_l(p) = Σ_g α_{l,g}(p) · B_l^g diag(γ_{l,g}(p)) A_l^g  (+ B_l^s A_l^s, the shared LoRA)

In training (`AggregatedLoRA.set`) the update is applied per sample by forward hooks on the stacked low-rank
factors, never as a dense ΔW per concept. At inference (`fuse`) one dense ΔW per layer is added to the weight
once for a prompt, sampling runs at the base model's speed, and `unfuse` restores the exact original weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fl2t.expert import Expert


@dataclass
class ExpertStack:
    """All experts' LoRA factors, per adapted layer, in the experts' canonical order (G of them).

    A[m]: (G*r, in) — rows g*r..g*r+r-1 are expert g's A; B[m]: (G*r, out) — expert g's Bᵀ.
    Experts of lower rank are zero-padded to r; a layer an expert does not adapt is zero for it.
    """

    modules: list[str]
    rank: int
    n_experts: int
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]


def stack_experts(experts: list[Expert], unet: nn.Module) -> ExpertStack:
    modules = sorted({m for e in experts for m in e.modules})
    rank = max(e.rank for e in experts)
    G = len(experts)
    A, B = {}, {}
    for m in modules:
        lin = unet.get_submodule(m)
        a = torch.zeros(G, rank, lin.in_features)
        b = torch.zeros(G, rank, lin.out_features)
        for g, e in enumerate(experts):
            if f"{m}.lora_A.weight" in e.lora:
                r = e.rank
                a[g, :r] = e.lora[f"{m}.lora_A.weight"]  # (r, in)
                b[g, :r] = e.lora[f"{m}.lora_B.weight"].T  # (r, out)
        A[m], B[m] = a.reshape(G * rank, -1), b.reshape(G * rank, -1)
    return ExpertStack(modules, rank, G, A, B)


class AggregatedLoRA:
    """Adds the aggregated update to each adapted linear layer of `unet`.

    `set(alpha, gamma, shared)` arms the hooks for the next UNet call, per sample: alpha (B, L, G),
    gamma (B, L, G, r) or None (all ones), L = len(stack.modules). `off()` disarms them.
    """

    def __init__(
        self, unet: nn.Module, stack: ExpertStack, shared: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    ):
        self.stack = stack
        self.shared = shared  # module -> (A_s (r_s, in), B_s (out, r_s)), trained parameters
        self.linears = {m: unet.get_submodule(m) for m in stack.modules}
        self.mix: torch.Tensor | None = None  # (B, L, G*r): alpha * gamma, flattened per layer
        self.use_shared = False
        self._orig: dict[str, torch.Tensor] = {}
        device = next(unet.parameters()).device
        self.device = device
        self.A = {m: a.to(device) for m, a in stack.A.items()}
        self.B = {m: b.to(device) for m, b in stack.B.items()}
        self._handles = [lin.register_forward_hook(self._hook(i, m)) for i, (m, lin) in enumerate(self.linears.items())]

    def _mix(self, alpha: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        r = self.stack.rank
        w = alpha.unsqueeze(-1).expand(*alpha.shape, r) if gamma is None else alpha.unsqueeze(-1) * gamma
        return w.flatten(-2)  # (..., L, G*r)

    def set(self, alpha: torch.Tensor, gamma: torch.Tensor | None = None, shared: bool = False) -> None:
        self.mix = self._mix(alpha, gamma).to(self.device)  # weights made on the CPU work on a GPU UNet
        self.use_shared = shared

    def off(self) -> None:
        self.mix = None
        self.use_shared = False

    def _hook(self, index: int, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if self.mix is None:
                return out
            x = args[0]  # (B', N, in); B' is a multiple of the armed batch (classifier-free guidance doubles it)
            mix = self.mix[:, index]  # (B, G*r)
            if x.shape[0] != mix.shape[0]:
                mix = mix.repeat(x.shape[0] // mix.shape[0], 1)
            h = (x @ self.A[name].T.to(x.dtype)) * mix.unsqueeze(1).to(x.dtype)  # (B', N, G*r)
            delta = h @ self.B[name].to(x.dtype)  # (B', N, out)
            if self.use_shared and self.shared is not None:
                a_s, b_s = self.shared[name]
                delta = delta + (x @ a_s.T.to(x.dtype)) @ b_s.T.to(x.dtype)
            return out + delta

        return hook

    @torch.no_grad()
    def fuse(self, alpha: torch.Tensor, gamma: torch.Tensor | None = None, shared: bool = True) -> None:
        """Add ΔW_l for one prompt (alpha (L, G), gamma (L, G, r)) into the weights; hooks stay off."""
        if self._orig:
            raise RuntimeError("already fused; unfuse first")
        self.off()
        mix = self._mix(alpha, gamma).to(self.device)  # (L, G*r)
        for i, (name, lin) in enumerate(self.linears.items()):
            self._orig[name] = lin.weight.detach().clone()
            delta = self.B[name].T @ (mix[i].unsqueeze(1) * self.A[name])  # (out, G*r) @ (G*r, in)
            if shared and self.shared is not None:
                a_s, b_s = self.shared[name]
                delta = delta + b_s @ a_s
            lin.weight += delta.to(lin.weight.dtype)

    @torch.no_grad()
    def unfuse(self) -> None:
        for name, w in self._orig.items():
            self.linears[name].weight.copy_(w)
        self._orig.clear()

    def remove(self) -> None:
        self.unfuse()
        for h in self._handles:
            h.remove()
