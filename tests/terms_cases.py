"""Models, data, loss functions and written-out references for the loss-term tests.

Shared by ``test_terms.py`` (one process) and ``terms_workers.py`` (two gloo
ranks). Everything is float64. Each case has a ``loss_fn``/``count`` for
truebatch and a ``reference`` that computes the big batch's loss on the
whole batch with the formulas written out here, independently of
``truebatch.reductions``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import truebatch as tb

DTYPE = torch.float64
VOCAB = 11
MAX_LEN = 12
KL_WEIGHT = 0.1
DR_GRPO_L = 8.0
EXPERTS = 3
FEATURES = 4
AUX_WEIGHT = 0.05
Batch = dict[str, torch.Tensor]


class TinyCausalLM(nn.Module):
    """Embedding, one causal self-attention layer and a head: a tiny decoder."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(MAX_LEN, width)
        self.attention = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        h = self.embed(input_ids) + self.position(torch.arange(length))
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        attended, _ = self.attention(h, h, h, attn_mask=causal, need_weights=False)
        return self.head(torch.tanh(h + attended))


class ToyMoE(nn.Module):
    """A top-1 mixture of experts per token, then a regression head."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(FEATURES, EXPERTS)
        self.experts = nn.ModuleList(nn.Linear(FEATURES, FEATURES) for _ in range(EXPERTS))
        self.head = nn.Linear(FEATURES, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction per token ``(B, T)`` and router probabilities ``(B, T, E)``."""
        probs = self.router(x).softmax(dim=-1)
        chosen = probs.argmax(dim=-1, keepdim=True)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # B, T, E, F
        picked = outputs.gather(-2, chosen.unsqueeze(-1).expand(*chosen.shape, FEATURES))
        mixed = picked.squeeze(-2) * probs.gather(-1, chosen)
        return self.head(torch.tanh(mixed)).squeeze(-1), probs


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().to(DTYPE)


def rl_batch(n: int, seed: int) -> Batch:
    """``n`` prompt+response rows, right-padded to MAX_LEN; ``mask[s, t]`` is 1 where token
    ``t + 1`` is a response token. Some responses are empty (a row without scored tokens)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(n, MAX_LEN, dtype=torch.long)
    mask = torch.zeros(n, MAX_LEN - 1, dtype=DTYPE)
    for row in range(n):
        prompt = int(torch.randint(1, 4, (), generator=g))
        response = int(torch.randint(0, MAX_LEN - prompt + 1, (), generator=g))
        if row % 5 == 3:
            response = 0
        length = prompt + response
        input_ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=g)
        mask[row, prompt - 1 : length - 1] = 1.0
    shape = (n, MAX_LEN - 1)
    return {
        "input_ids": input_ids,
        "mask": mask,
        "old_logp": -torch.rand(shape, generator=g, dtype=DTYPE) * 3,
        "ref_logp": -torch.rand(shape, generator=g, dtype=DTYPE) * 3,
        "advantages": torch.randn(n, generator=g, dtype=DTYPE),
    }


def moe_batch(n: int, seed: int) -> Batch:
    """``n`` sequences of 1..6 tokens (padded to 6) with a regression target per token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (n,), generator=g)
    mask = (torch.arange(6) < lengths[:, None]).to(DTYPE)
    return {
        "x": torch.randn(n, 6, FEATURES, generator=g, dtype=DTYPE),
        "target": torch.randn(n, 6, generator=g, dtype=DTYPE),
        "mask": mask,
    }


def token_logp(model: nn.Module, batch: Batch) -> torch.Tensor:
    """log p(token t + 1 | tokens <= t), shape ``(B, MAX_LEN - 1)``."""
    logits = model(batch["input_ids"])[:, :-1]
    targets = batch["input_ids"][:, 1:]
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def ppo_token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The clipped PPO surrogate per token (unmasked)."""
    ratio = (token_logp(model, batch) - batch["old_logp"]).exp()
    advantage = batch["advantages"][:, None]
    return -torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)


def kl_token(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The k3 estimator of KL(policy || reference) per token (unmasked)."""
    delta = batch["ref_logp"] - token_logp(model, batch)
    return delta.exp() - delta - 1


def sequences(mask: torch.Tensor) -> torch.Tensor:
    """Rows with at least one scored token."""
    return mask.sum(-1) > 0


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A loss with terms: truebatch's ``loss_fn``/``count`` and the written-out reference
    ``reference(model, full_batch) -> (loss, {term: mean}, {term: count})``."""

    model: Callable[[], nn.Module]
    batch: Callable[[int, int], Batch]
    loss_fn: Callable[[nn.Module, Batch], dict[str, torch.Tensor]]
    count: dict[str, Any]
    reference: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict, dict]]


def _policy_kl() -> Case:
    policy = tb.reductions.token_mean("mask")

    def loss_fn(model: nn.Module, mb: Batch) -> dict[str, torch.Tensor]:
        per_sequence_kl = (kl_token(model, mb) * mb["mask"]).sum(-1)
        return {
            "policy": policy.sum(ppo_token_loss(model, mb), mb["mask"]),
            "kl": per_sequence_kl.sum(),
        }

    def count_sequences(mb: Batch) -> torch.Tensor:
        return sequences(mb["mask"]).sum()

    def reference(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict, dict]:
        m = batch["mask"]
        n_tokens, n_seq = m.sum(), sequences(m).sum()
        policy_mean = (ppo_token_loss(model, batch) * m).sum() / n_tokens
        kl_mean = (kl_token(model, batch) * m).sum(-1)[sequences(m)].sum() / n_seq
        loss = policy_mean + KL_WEIGHT * kl_mean
        return loss, {"policy": policy_mean, "kl": kl_mean}, {"policy": n_tokens, "kl": n_seq}

    count = {"policy": policy, "kl": tb.term(count_sequences, weight=KL_WEIGHT)}
    return Case(TinyCausalLM, rl_batch, loss_fn, count, reference)


def _preset(name: str) -> Case:
    reduction = {
        "token_mean": tb.reductions.token_mean("mask"),
        "seq_mean_token_mean": tb.reductions.seq_mean_token_mean("mask"),
        "seq_mean_token_sum_norm": tb.reductions.seq_mean_token_sum_norm(DR_GRPO_L, "mask"),
    }[name]

    def loss_fn(model: nn.Module, mb: Batch) -> dict[str, torch.Tensor]:
        return {"policy": reduction.sum(ppo_token_loss(model, mb), mb["mask"])}

    def reference(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict, dict]:
        m = batch["mask"]
        losses = ppo_token_loss(model, batch) * m
        rows = sequences(m)
        if name == "token_mean":
            value, n = losses.sum() / m.sum(), m.sum()
        elif name == "seq_mean_token_mean":
            value, n = (losses.sum(-1)[rows] / m.sum(-1)[rows]).mean(), rows.sum()
        else:
            value, n = losses.sum() / (rows.sum() * DR_GRPO_L), rows.sum()
        return value, {"policy": value}, {"policy": n}

    return Case(TinyCausalLM, rl_batch, loss_fn, {"policy": reduction}, reference)


def switch_fractions(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per expert, the fraction of the batch's tokens routed to it (no gradient: argmax)."""
    with torch.no_grad():
        _, probs = model(batch["x"])
        chosen = nn.functional.one_hot(probs.argmax(-1), EXPERTS).to(DTYPE)
        return (chosen * batch["mask"][..., None]).sum((0, 1)) / batch["mask"].sum()


def _moe(aux: str, fractions: list[torch.Tensor] | None = None) -> Case:
    """``aux="sequence"``: a load-balancing loss per sequence, averaged over sequences.
    ``aux="batch"``: the Switch loss over the whole batch, ``E * sum_e f_e * P_e``, where
    ``fractions[0]`` holds the batch's f (computed before the window, no gradient) and
    ``P_e`` is a token mean: exact as a term over tokens."""
    main = tb.reductions.token_mean("mask")

    def loss_fn(model: nn.Module, mb: Batch) -> dict[str, torch.Tensor]:
        y, probs = model(mb["x"])
        m = mb["mask"]
        if aux == "sequence":
            chosen = nn.functional.one_hot(probs.argmax(-1), EXPERTS).to(DTYPE)
            tokens = m.sum(-1, keepdim=True)
            f = (chosen * m[..., None]).sum(1) / tokens
            p = (probs * m[..., None]).sum(1) / tokens
            aux_sum = (EXPERTS * (f * p).sum(-1)).sum()
        else:
            assert fractions is not None
            aux_sum = EXPERTS * ((probs * m[..., None]).sum((0, 1)) * fractions[0]).sum()
        return {"main": main.sum((y - mb["target"]) ** 2, m), "aux": aux_sum}

    def reference(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict, dict]:
        y, probs = model(batch["x"])
        m = batch["mask"]
        n_tokens = m.sum()
        main_mean = (((y - batch["target"]) ** 2) * m).sum() / n_tokens
        chosen = nn.functional.one_hot(probs.argmax(-1), EXPERTS).to(DTYPE)
        if aux == "sequence":
            f = (chosen * m[..., None]).sum(1) / m.sum(-1, keepdim=True)
            p = (probs * m[..., None]).sum(1) / m.sum(-1, keepdim=True)
            aux_mean, n_aux = (EXPERTS * (f * p).sum(-1)).mean(), torch.tensor(len(m))
        else:
            f = (chosen * m[..., None]).sum((0, 1)).detach() / n_tokens
            p = (probs * m[..., None]).sum((0, 1)) / n_tokens
            aux_mean, n_aux = EXPERTS * (f * p).sum(), n_tokens
        loss = main_mean + AUX_WEIGHT * aux_mean
        return loss, {"main": main_mean, "aux": aux_mean}, {"main": n_tokens, "aux": n_aux}

    aux_count = tb.count_samples if aux == "sequence" else main
    count = {"main": main, "aux": tb.term(aux_count, weight=AUX_WEIGHT)}
    return Case(ToyMoE, moe_batch, loss_fn, count, reference)


def case(name: str, fractions: list[torch.Tensor] | None = None) -> Case:
    """The case called ``name`` (``fractions``: the holder of the MoE batch's f)."""
    if name == "policy_kl":
        return _policy_kl()
    if name.startswith("moe_"):
        return _moe(name.removeprefix("moe_"), fractions)
    return _preset(name)


CASES = [
    "policy_kl",
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
    "moe_sequence",
    "moe_batch",
]
