"""Sampling as small pure functions over logits [B, V]: filters, and a sync-free categorical draw."""

from __future__ import annotations

from collections.abc import Callable

import torch

Sampler = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]  # logits -> ids [B]


def greedy(logits_BV: torch.Tensor) -> torch.Tensor:
    return logits_BV.argmax(dim=-1)


def apply_temperature(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits_BV / temperature


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept), -inf elsewhere."""
    k = min(k, logits_BV.shape[-1])
    kth = torch.topk(logits_BV, k, dim=-1).values[..., -1:]
    return logits_BV.masked_fill(logits_BV < kth, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass reaches ``p``."""
    sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits_BV.masked_fill(drop, float("-inf"))


def min_p_filter(logits_BV: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's."""
    probs = logits_BV.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits_BV.masked_fill(probs < threshold, float("-inf"))


def categorical(logits_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id per row from softmax(logits) as argmax(p / Exp(1) noise): no sync, no multinomial."""
    probs = logits_BV.float().softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def make_sampler(
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> Sampler:
    """A callable ``(logits [B, V], generator) -> ids [B]``.

    ``temperature <= 0`` is greedy (the filters are then irrelevant). Otherwise logits are divided
    by the temperature, then the top-k, top-p and min-p filters apply, in that order.
    """
    if temperature <= 0:
        return lambda logits, generator=None: greedy(logits)

    def sample(logits_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logits_BV = apply_temperature(logits_BV.float(), temperature)
        if top_k is not None and top_k > 0:
            logits_BV = top_k_filter(logits_BV, top_k)
        if top_p is not None and top_p < 1.0:
            logits_BV = top_p_filter(logits_BV, top_p)
        if min_p is not None and min_p > 0.0:
            logits_BV = min_p_filter(logits_BV, min_p)
        return categorical(logits_BV, generator)

    return sample


def inverse_cdf(logits_BV: torch.Tensor, u_B: torch.Tensor, block: int = 256, *,
                overwrite: bool = False, top_B1: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one id per row from softmax(logits) by inverting its CDF at ``u`` in [0, 1).

    One uniform per row, so a row's draw depends on its own ``u`` and logits only, not on the
    rows batched with it; on CPU it is several times cheaper than a noise tensor over the
    vocabulary. The CDF is walked in two levels (blocks of ``block`` ids, then one block) so the
    long float32 prefix sums stay short. Zero-probability ids are never drawn. With ``overwrite`` a
    float32 ``logits_BV`` is used as the work buffer (its values are lost): one [B, V] allocation less.
    ``top_B1``: the rows' maxima [B, 1] when the caller has them (one pass over the logits less).
    """
    B, V = logits_BV.shape
    logits_BV = logits_BV.float()
    if top_B1 is None:
        top_B1 = logits_BV.amax(dim=-1, keepdim=True)
    p_BV = (logits_BV.sub_(top_B1) if overwrite else logits_BV - top_B1).exp_()
    N = -(-V // block)
    if N * block != V:
        p_BV = torch.nn.functional.pad(p_BV, (0, N * block - V))
    p_BNb = p_BV.view(B, N, block)
    mass_BN = p_BNb.sum(dim=-1)
    cum_BN = mass_BN.cumsum(dim=-1)
    total_B1 = cum_BN[:, -1:]
    below = lambda x: torch.nextafter(x, torch.zeros_like(x))  # noqa: E731  (keeps u * total < total)
    target_B1 = torch.minimum(u_B.to(total_B1)[:, None] * total_B1, below(total_B1))
    n_B1 = torch.searchsorted(cum_BN, target_B1, right=True).clamp_(max=N - 1)
    rest_B1 = (target_B1 - (cum_BN.gather(-1, n_B1) - mass_BN.gather(-1, n_B1))).clamp_(min=0)
    within_Bb = p_BNb[torch.arange(B, device=p_BNb.device), n_B1[:, 0]].cumsum(dim=-1)
    last_B1 = within_Bb[:, -1:]
    rest_B1 = torch.minimum(rest_B1, below(last_B1))
    j_B1 = torch.searchsorted(within_Bb, rest_B1, right=True).clamp_(max=block - 1)
    return (n_B1 * block + j_B1)[:, 0]
