"""Losses for training a sparse MoE: next-token cross-entropy, the load-balancing loss and router z-loss.

Shape legend: N tokens (batch x seq, all layers pooled where said), E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    n_experts: int,
    top_k: int,
    mask: torch.Tensor | None = None,
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
    per_layer: bool = False,
) -> torch.Tensor:
    """Switch-Transformer balancing loss, pooled over layers, as `transformers` computes it for Mixtral:

        n_experts * sum_e sum_k f_{k,e} * P_e

    where f_{k,e} is the fraction of tokens whose k-th choice is expert e and P_e the mean router
    probability of e, both over all (non-masked) tokens of all layers; it equals top_k at perfect
    balance. `mask` ([batch, seq], 1 = real token) keeps
    padding out of both statistics; `router_logits` are per layer, [batch * seq, E] each.

    `pool` (data-parallel training) sums a tensor over the ranks, differentiably (e.g.
    `parallel.sum_over_group`): f and P are then those of every rank's tokens together, as one process
    holding the whole batch computes them; the loss is the same on every rank.

    `per_layer`: the mean over layers of each layer's own loss instead (also top_k at balance). Pooled,
    one layer's skew toward an expert can be offset by another layer's skew away from it.
    """
    if per_layer:
        losses = [load_balancing_loss([r], n_experts, top_k, mask, pool) for r in router_logits]
        return torch.stack(losses).mean()
    logits_NE = torch.cat([r.float() for r in router_logits], dim=0)
    probs_NE = torch.softmax(logits_NE, dim=-1)
    chosen_NK = torch.topk(probs_NE, top_k, dim=-1).indices
    assigned_NKE = F.one_hot(chosen_NK, n_experts).float()
    if pool is not None:  # sums and counts over all ranks first, then the means
        w_N = torch.ones(probs_NE.shape[0]) if mask is None else mask.reshape(-1).float().repeat(len(router_logits))
        w_N = w_N.to(probs_NE.device)
        n = pool(w_N.sum())
        tokens_per_expert_KE = pool((assigned_NKE * w_N[:, None, None]).sum(0)) / n
        prob_per_expert_E = pool((probs_NE * w_N[:, None]).sum(0)) / n
    elif mask is None:
        tokens_per_expert_KE = assigned_NKE.mean(dim=0)
        prob_per_expert_E = probs_NE.mean(dim=0)
    else:
        w_N = mask.reshape(-1).float().repeat(len(router_logits))  # layers were stacked along N
        tokens_per_expert_KE = (assigned_NKE * w_N[:, None, None]).sum(0) / w_N.sum()
        prob_per_expert_E = (probs_NE * w_N[:, None]).sum(0) / w_N.sum()
    return n_experts * (tokens_per_expert_KE * prob_per_expert_E[None]).sum()


def router_z_loss(router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens (and layers) of logsumexp(router logits)^2; keeps logits small."""
    z_N = torch.cat([torch.logsumexp(r.float(), dim=-1) for r in router_logits]) ** 2
    if mask is None:
        return z_N.mean()
    w_N = mask.reshape(-1).float().repeat(len(router_logits))
    return (z_N * w_N).sum() / w_N.sum()


def expert_load(router_logits: Sequence[torch.Tensor], n_experts: int, top_k: int) -> torch.Tensor:
    """Share of routed (token, slot) assignments per layer and expert, [layers, E]; 1/E is balanced."""
    rows = []
    for r in router_logits:
        idx = torch.topk(r.detach(), top_k, dim=-1).indices.reshape(-1)
        rows.append(torch.bincount(idx, minlength=n_experts).float() / idx.numel())
    return torch.stack(rows)


def first_choice_load(router_logits: Sequence[torch.Tensor], n_experts: int) -> torch.Tensor:
    """Share of tokens whose first choice is each expert, per layer, [layers, E]; 1/E is balanced."""
    rows = []
    for r in router_logits:
        idx = r.detach().argmax(dim=-1)
        rows.append(torch.bincount(idx, minlength=n_experts).float() / idx.numel())
    return torch.stack(rows)


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where `mask` is true (float32 for stability)."""
    losses = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none")
    m = mask_BT.flatten().float()
    return (losses * m).sum() / m.sum().clamp(min=1)
