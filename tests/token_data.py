"""Data, models and losses of the token tests, and their 2-process gloo worker.

``tests/test_tokens.py`` imports the helpers; :func:`launch` runs :data:`CASES`
on two spawned gloo processes (DDP), each rank saving the gradient its
optimizer stepped on, so the test can compare it with one process on the
global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import dist_workers
import truebatch as tb
from models import IGNORE_INDEX, PAD_ID, VOCAB, GRULanguageModel, lm_loss, seeded

WORLD_SIZE = dist_workers.WORLD_SIZE


def variable_length_batch(n: int, seed: int, shortest: int, longest: int) -> dict[str, Any]:
    """``n`` right-padded sequences of lengths in [shortest, longest], with a mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(1, VOCAB, (n, width), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, PAD_ID)
    return {
        "input_ids": ids,
        "attention_mask": mask.long(),
        "labels": ids.masked_fill(~mask, IGNORE_INDEX),
    }


class DocumentAttentionLM(nn.Module):
    """Embeddings of token and position, one causal attention layer that stays within
    a document, a head. Documents are the runs of ``position_ids`` from 0."""

    def __init__(self, width: int = 8, positions: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(positions, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + self.position(position_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        document = (position_ids == 0).cumsum(1)
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal & (document[:, :, None] == document[:, None, :])
        scores = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        attention = scores.masked_fill(~allowed, -math.inf).softmax(-1)
        return self.head(torch.tanh(h + self.out(attention @ v)))


class _OutOfMemoryInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, message: str) -> torch.Tensor:
        ctx.message = message
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        raise torch.OutOfMemoryError(ctx.message)


class TokenRoom(nn.Module):
    """:class:`GRULanguageModel` on a device with room for ``limit`` real tokens per pass.

    A pass over more tokens raises ``torch.OutOfMemoryError`` in forward or in
    backward (``where``), after the embedding ran and a random number was drawn,
    so a failed attempt has built a graph and moved the RNG. Under
    torch.distributed ``limit`` may be one per rank. ``seen`` records the real
    tokens of every pass.
    """

    def __init__(self, limit: int | tuple[int, ...], where: str = "forward") -> None:
        super().__init__()
        self.lm = GRULanguageModel()
        self.limit, self.where = limit, where
        self.seen: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = int((input_ids != PAD_ID).sum())
        self.seen.append(tokens)
        h = self.lm.embed(input_ids)
        torch.rand(())  # moves the RNG: a retry must start from the window's RNG state
        limit = self.limit
        if isinstance(limit, tuple):
            limit = (
                limit[torch.distributed.get_rank()]
                if torch.distributed.is_initialized()
                else max(limit)
            )
        if tokens > limit:
            message = f"injected: {tokens} tokens > room for {limit}"
            if self.where == "forward":
                raise torch.OutOfMemoryError(message)
            h = _OutOfMemoryInBackward.apply(h, message)
        hidden, _ = self.lm.gru(h)
        return self.lm.head(hidden)


def documents(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (10,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def pack(docs: list[torch.Tensor], rows: list[list[int]], width: int) -> dict[str, torch.Tensor]:
    """Rows holding the given documents back to back, right-padded to ``width``; the
    padding is one more run of positions from 0 with ignored labels."""
    ids = torch.full((len(rows), width), PAD_ID)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d in row:
            n = len(docs[d])
            ids[r, at : at + n], labels[r, at : at + n] = docs[d], docs[d]
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def packed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss that predicts no document's first token from the previous one."""
    logits = model(batch["input_ids"], batch["position_ids"])
    labels = batch["labels"].masked_fill(batch["position_ids"] == 0, IGNORE_INDEX)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


# ------------------------------------------------------------ two gloo ranks


class Case:
    """Windows of a global batch, each rank's micro-batches of it, the loss and the count.

    ``reference(w)`` is the global batch of window ``w`` for the one-process
    reference; ``micro_batches(w, rank)`` what ``rank`` runs in that window.
    ``options`` are the Accumulator's; ``plain(model)`` is the model the
    reference runs (without checkpointing, with room for any batch).
    """

    def __init__(
        self,
        model: Callable[[], nn.Module],
        windows: int,
        reference: Callable[[int], tuple[dict[str, torch.Tensor], Callable]],
        micro_batches: Callable[[int, int], list[dict[str, Any]]],
        loss: Callable[[nn.Module, Any], torch.Tensor],
        count: Callable[[Any], Any],
        *,
        options: dict[str, Any] | None = None,
        plain: Callable[[nn.Module], nn.Module] = lambda model: model,
    ) -> None:
        self.model, self.windows, self.reference = model, windows, reference
        self.micro_batches, self.loss, self.count = micro_batches, loss, count
        self.options, self.plain = options or {}, plain


def budget_window(w: int) -> dict[str, Any]:
    return variable_length_batch(13, seed=10 + w, shortest=2, longest=12)


def budget_micro_batches(w: int, rank: int) -> list[dict[str, Any]]:
    """Rank 0 holds 8 sequences, rank 1 five, each cut by its own token budget."""
    rows = slice(0, 8) if rank == 0 else slice(8, 13)
    share = {key: value[rows] for key, value in budget_window(w).items()}
    return tb.split(share, max_tokens=(20, 30)[w])


PACKED_ROWS = (
    ([[0, 1, 2], [3, 4, 5]], [[6, 7], [8], [9]]),
    ([[9, 3], [1], [0, 8, 2]], [[4, 5, 6, 7]]),
)


def unpacked(w: int) -> dict[str, torch.Tensor]:
    docs = documents(seed=20 + w)
    return pack(docs, [[d] for d in range(len(docs))], max(len(d) for d in docs))


def packed_micro_batches(w: int, rank: int) -> list[dict[str, torch.Tensor]]:
    docs, rows = documents(seed=20 + w), PACKED_ROWS[w][rank]
    width = max(sum(len(docs[d]) for d in row) for row in rows)
    return tb.split(pack(docs, rows, width), 1)


class CheckpointedBlock(nn.Module):
    """Pre-norm causal self-attention and MLP, split-invariant dropout on the attention
    weights and on both residual branches."""

    def __init__(self, width: int = 8, heads: int = 2, p: float = 0.3) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.attention_dropout = tb.nn.SplitInvariantDropout(p)
        self.dropout1 = tb.nn.SplitInvariantDropout(p)
        self.dropout2 = tb.nn.SplitInvariantDropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, -1).transpose(1, 2)
            for t in self.qkv(self.norm1(x)).chunk(3, dim=-1)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        weights = self.attention_dropout(scores.masked_fill(~causal, -math.inf).softmax(-1))
        attended = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.dropout1(self.proj(attended))
        return x + self.dropout2(self.mlp(self.norm2(x)))


class CheckpointedLM(nn.Module):
    """Embedding -> two :class:`CheckpointedBlock` -> head, each block recomputed in
    backward by ``torch.utils.checkpoint`` (``use_reentrant`` True or False; None: not
    checkpointed, the reference)."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.blocks = nn.ModuleList([CheckpointedBlock(), CheckpointedBlock()])
        self.head = nn.Linear(8, VOCAB)
        self.use_reentrant = use_reentrant

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            if self.use_reentrant is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.use_reentrant)
        return self.head(h)


def checkpointed_lm(use_reentrant: bool) -> nn.Module:
    """Layer ids renumbered 0, 1, ...: the same masks in every process whatever it built."""
    return tb.nn.convert_dropout(seeded(lambda: CheckpointedLM(use_reentrant)), seed=7)


def without_checkpointing(model: nn.Module) -> nn.Module:
    model.use_reentrant = None
    return model


def with_room(model: nn.Module) -> nn.Module:
    model.limit = 10**9
    return model


def rank_share(w: int, rank: int) -> list[dict[str, Any]]:
    """Rank 0's 8 sequences and rank 1's 5 of :func:`budget_window`, one piece each."""
    rows = slice(0, 8) if rank == 0 else slice(8, 13)
    return [{key: value[rows] for key, value in budget_window(w).items()}]


def split_unevenly(w: int, rank: int) -> list[dict[str, Any]]:
    """:func:`rank_share` cut into micro-batches of 3 sequences (the last shorter)."""
    return tb.split(rank_share(w, rank)[0], 3)


CASES = {
    "budget": Case(
        lambda: seeded(GRULanguageModel),
        2,
        lambda w: (budget_window(w), tb.count_tokens()),
        budget_micro_batches,
        lm_loss,
        tb.count_tokens(),
    ),
    "packed": Case(
        lambda: seeded(DocumentAttentionLM),
        2,
        lambda w: (unpacked(w), tb.count_tokens(position_ids="position_ids")),
        packed_micro_batches,
        packed_loss,
        tb.count_tokens(position_ids="position_ids"),
    ),
    # max_tokens="auto": rank 1 has room for 20 tokens per pass, rank 0 for all; rank 1's
    # out-of-memory makes both retry, each at max(its longest sample, failed // 2).
    "auto": Case(
        lambda: seeded(lambda: TokenRoom((10**9, 20))),
        2,
        lambda w: (budget_window(w), tb.count_tokens()),
        rank_share,
        lm_loss,
        tb.count_tokens(),
        options={"max_tokens": "auto"},
        plain=with_room,
    ),
    # Split-invariant dropout under activation checkpointing, both reentrant modes.
    **{
        f"checkpoint-{mode}": Case(
            partial(checkpointed_lm, reentrant),
            2,
            lambda w: (budget_window(w), tb.count_tokens()),
            split_unevenly,
            lm_loss,
            tb.count_tokens(),
            plain=without_checkpointing,
        )
        for mode, reentrant in (("reentrant", True), ("non_reentrant", False))
    },
}

# Rank 1's longest sample alone does not fit: every rank must raise, none may hang.
STUCK = Case(
    lambda: seeded(lambda: TokenRoom((10**9, 6))),
    1,
    lambda w: (budget_window(w), tb.count_tokens()),
    rank_share,
    lm_loss,
    tb.count_tokens(),
    options={"max_tokens": "auto"},
)


def run_case(case: Case, rank: int) -> dict[str, list]:
    """This rank's windows under DDP: the weights before each, the gradients stepped on."""
    model = case.model()
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    seen: list[list[torch.Tensor]] = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() for p in model.parameters()])
    )
    acc = tb.Accumulator(wrapped, optimizer, **case.options)
    before, errors, budgets = [], [], []
    for w in range(case.windows):
        before.append([p.detach().clone() for p in model.parameters()])
        try:
            acc.step_window(case.micro_batches(w, rank), case.loss, count=case.count)
        except RuntimeError as error:
            errors.append(str(error))
        budgets.append(acc.state_dict()["auto_max_tokens"])
    after = [p.detach().clone() for p in model.parameters()]
    return {"before": before, "seen": seen, "errors": errors, "budgets": budgets, "after": after}


def launch(out_dir: Path, timeout: float) -> None:
    """Run :data:`CASES` and :data:`STUCK` on two spawned gloo processes; fail if one
    fails or hangs."""
    # By name: the cases hold lambdas, which the spawned processes cannot unpickle.
    names = [*CASES, "stuck"]
    dist_workers.launch({name: name for name in names}, out_dir, timeout, run=run_named)


def run_named(name: str, rank: int) -> dict[str, list]:
    return run_case(STUCK if name == "stuck" else CASES[name], rank)
