"""Span-restricted cross-attention keys and values (DESIGN §3, Inference).

In a cross-attention layer the key and value of text token t are `W_k c_t` and `W_v c_t`: they depend on that
token's text state c_t alone. So the update of expert g on `attn2.to_k` / `attn2.to_v` can be restricted to the
positions of g's own tokens, exactly:

    k_t = W_k c_t + Σ_g [t ∈ span_g] · B_k^g diag(w_g) A_k^g c_t        (v alike)

and every other token's key and value are the base model's. The experts of the concepts a prompt names then
change what their own tokens say to the image and nothing the rest of the prompt says; their updates on every
other adapted layer (self-attention, queries, outputs) are applied to the whole image as before, fused or by the
aggregated hooks (`fl2t.fusion`). The cost is G low-rank products over the prompt's ≤ 77 tokens per key/value
layer; the text states do not depend on the timestep, so the product is computed at the first denoising step of
a prompt batch and reused at the others.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTokenizer

from fl2t.fusion import ExpertStack

KEY_VALUE = (".attn2.to_k", ".attn2.to_v")


def is_key_value(module: str) -> bool:
    """Whether a UNet linear layer makes cross-attention keys or values (its input is the text states alone)."""
    return module.endswith(KEY_VALUE)


def prompt_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, T) token ids as diffusers' pipelines encode the prompts: padded to the tokenizer's length, truncated."""
    T = tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=T, truncation=True, return_tensors="pt").input_ids


class SpanKV:
    """Adds each named expert's update on the cross-attention keys and values at its own tokens' positions only.

    `token_ids[g]`: the token ids of expert g (the stack's order). `arm(input_ids, alpha, gamma)` arms the hooks for
    the next UNet calls, per prompt: expert g is *named* by a prompt that contains all of g's tokens, and its update
    `alpha_{l,g} · B diag(gamma_{l,g}) A` on each key/value layer l is added at the positions of its tokens. `arm`
    returns the rest, alpha with those entries zeroed, for the caller to apply to every token of every adapted layer
    (`AggregatedLoRA.set` or `.fuse`): an expert a prompt does not name keeps its update everywhere.

    The UNet's batch is the armed prompts as diffusers' pipelines lay them out: each prompt's images consecutive
    and, with classifier-free guidance (`guided`), the unconditional half first, which names no concept and gets
    no update. The update depends on the text states only, so it is computed once for the states of a prompt batch
    (the first denoising step) and reused while the UNet gets the same states tensor unchanged.
    """

    def __init__(self, unet: nn.Module, stack: ExpertStack, token_ids: list[list[int]]) -> None:
        if len(token_ids) != stack.n_experts:
            raise ValueError(f"token ids for {len(token_ids)} experts; the stack has {stack.n_experts}")
        self.stack, self.token_ids = stack, token_ids
        self.rows = [i for i, m in enumerate(stack.modules) if is_key_value(m)]  # key/value layers in alpha's L
        device = next(unet.parameters()).device
        self.device = device
        names = [stack.modules[i] for i in self.rows]
        self.A = {m: stack.A[m].to(device) for m in names}
        self.B = {m: stack.B[m].to(device) for m in names}
        self.coef: torch.Tensor | None = None  # (B, K, T, G*r): per prompt, key/value layer, token
        self.guided = True
        self._cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self._handles = [unet.get_submodule(m).register_forward_hook(self._hook(k, m)) for k, m in enumerate(names)]

    def spans(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, G, T) bool: where each expert's tokens are in each prompt."""
        return torch.stack([torch.isin(input_ids, torch.tensor(ids)) for ids in self.token_ids], 1)

    def named(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, G) bool: the prompt contains every token of the expert."""
        found = [torch.stack([(input_ids == t).any(-1) for t in ids], -1).all(-1) for ids in self.token_ids]
        return torch.stack(found, -1)

    def arm(
        self,
        input_ids: torch.Tensor,
        alpha: torch.Tensor,
        gamma: torch.Tensor | None = None,
        guided: bool = True,
        where: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Arm for prompts `input_ids` (B, T) with weights alpha (B, L, G), gamma (B, L, G, r) or None (ones);
        returns the rest of alpha (B, L, G), to apply to every token. `where` (B, G) bool: the experts to restrict
        (default: those each prompt names). Differentiable in alpha and gamma (Step 2's student)."""
        named = (self.named(input_ids) if where is None else where.bool().cpu()).to(alpha.device)
        span = self.spans(input_ids).to(alpha.device)
        w = alpha[:, self.rows] * named[:, None]  # (B, K, G)
        r = self.stack.rank
        w = w.unsqueeze(-1).expand(*w.shape, r) if gamma is None else w.unsqueeze(-1) * gamma[:, self.rows]
        coef = span[:, None, :, :, None] * w[:, :, :, None, :]  # (B, K, G, T, r)
        self.coef = coef.transpose(2, 3).flatten(-2).to(self.device)  # (B, K, T, G*r), expert-major like A's rows
        self.guided = guided
        self._cache.clear()
        keep = torch.ones_like(alpha)
        keep[:, self.rows] = (~named[:, None]).to(alpha.dtype)
        return alpha * keep

    def off(self) -> None:
        self.coef = None
        self._cache.clear()

    def remove(self) -> None:
        self.off()
        for h in self._handles:
            h.remove()

    def _hook(self, k: int, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if self.coef is None:
                return out
            x = args[0]  # (B', T, in): text states, the same at every denoising step
            key = (x.data_ptr(), x.shape, x.stride(), x._version, x.dtype)  # the same tensor, not changed in place
            cached = self._cache.get(name)
            if cached is None or cached[0] != key:
                cached = (key, x, self._delta(k, name, x))  # x held: its memory is not reused while cached
                self._cache[name] = cached
            return out + cached[2]

        return hook

    def _delta(self, k: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """(B', T, out): the span-restricted update of key/value layer k for text states x."""
        coef = self.coef[:, k]  # (B, T, G*r)
        # Armed for guidance, a batch of exactly one row per prompt is the conditional prediction alone (as the
        # fidelity score calls the UNet); otherwise the unconditional half comes first, as in diffusers.
        guided = self.guided and x.shape[0] != coef.shape[0]
        halves = 2 if guided else 1
        if x.shape[0] % (halves * coef.shape[0]) or x.shape[1] != coef.shape[1]:
            layout = "a guidance batch of 2 x " if self.guided else ""
            raise ValueError(
                f"span-restricted keys/values armed for {layout}{coef.shape[0]} prompts of {coef.shape[1]} tokens; "
                f"{name} got text states {tuple(x.shape[:2])}"
            )
        coef = coef.repeat_interleave(x.shape[0] // (halves * coef.shape[0]), 0)  # each prompt's images
        if guided:
            coef = torch.cat([torch.zeros_like(coef), coef])  # the unconditional half names no concept
        h = (x @ self.A[name].T.to(x.dtype)) * coef.to(x.dtype)  # (B', T, G*r)
        return h @ self.B[name].to(x.dtype)
