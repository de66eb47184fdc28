"""Time of a loss with two terms against the same loss as one, through truebatch.

The loss is ``mean cross-entropy + c * mean squared logit`` over the samples.
Three loops train one shared float32 model on the same windows as
``overhead.py`` (its models, windows and timing):

- ``hand-written``: the correct loop by hand, the loss as one sum;
- ``one loss``: ``acc.step_window(window, loss_fn)``, ``loss_fn`` returning
  ``ce_sum + c * square_sum`` (one N: samples);
- ``two terms``: ``loss_fn`` returning ``{"ce": ce_sum, "l2": square_sum}``
  with ``count={"ce": None, "l2": tb.term(None, weight=c)}``.

The two truebatch loops compute the same forward and the same gradient (checked
first); they differ only in the term machinery: one count per term, the
per-term weights, one loss sum per term. Prints, per model and k, the median
over rounds of the ratio two terms / one loss within a round (the noise of
the machine shows in how far ``one loss`` / ``hand-written`` strays from the
same ratio in overhead.py).

    python benchmarks/terms_overhead.py [--repeats 60] [--ks 4,8]
    python benchmarks/terms_overhead.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from overhead import CASES, CLOCKS, Case, Window, adamw, make_windows, paired_ratio, timed
from torch import nn
from tqdm import tqdm

import truebatch as tb

PENALTY = 1e-4


def parts(model: nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    x, y = micro_batch
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="sum"), logits.square().mean(-1).sum()


def hand_written(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Window], None]:
    def train(window: Window) -> None:
        n = sum(len(y) for _, y in window)
        for micro_batch in window:
            ce, square = parts(model, micro_batch)
            ((ce + PENALTY * square) / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def one_loss(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Window], None]:
    acc = tb.Accumulator(model, optimizer)

    def loss_fn(model: nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ce, square = parts(model, micro_batch)
        return ce + PENALTY * square

    return lambda window: acc.step_window(window, loss_fn)


def two_terms(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Window], None]:
    acc = tb.Accumulator(model, optimizer)
    count = {"ce": None, "l2": tb.term(None, weight=PENALTY)}

    def loss_fn(model: nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        ce, square = parts(model, micro_batch)
        return {"ce": ce, "l2": square}

    return lambda window: acc.step_window(window, loss_fn, count)


LOOPS = {"hand-written": hand_written, "one loss": one_loss, "two terms": two_terms}


def measure(
    case: Case, k: int, repeats: int, clock: Callable[[], float], progress: tqdm
) -> dict[str, list[float]]:
    """Seconds per window of each loop; rounds rotate the order (as overhead.py's)."""
    torch.manual_seed(0)
    initial = case.model()
    windows = make_windows(case, k, 2)
    trained = {loop: copy.deepcopy(initial) for loop in LOOPS}
    for loop, model in trained.items():
        train = LOOPS[loop](model, adamw(model))
        for window in windows:
            train(window)
    for loop, model in trained.items():
        error = tb.max_relative_difference(
            list(model.parameters()), list(trained["hand-written"].parameters())
        )
        if error > 1e-5:
            raise RuntimeError(f"{loop} took other steps than the hand-written loop ({error:.1e})")
    shared = copy.deepcopy(initial)
    optimizer = adamw(shared)
    loops = [(loop, make(shared, optimizer)) for loop, make in LOOPS.items()]
    for _, train in loops:
        train(windows[0])
    times: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    for index in range(repeats):
        shift = index % len(loops)
        for loop, train in loops[shift:] + loops[:shift]:
            times[loop].append(timed(train, windows[index % 2], clock))
        progress.update()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60, help="timed rounds per case")
    parser.add_argument("--ks", default="4,8", help="micro-batches per window, comma-separated")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="k=4, 2 rounds: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.ks = 2, "4"
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU, float32, 1 thread, {args.clock} time")
    clock = CLOCKS[args.clock]
    with tqdm(total=len(CASES) * len(ks) * args.repeats, desc="rounds", disable=None) as progress:
        rows = [(c, k, measure(c, k, args.repeats, clock, progress)) for c in CASES for k in ks]
    print(f"\n{'model':<6}{'k':>3}{'hand-written':>15}{'one loss':>12}{'two terms':>13}", end="")
    print(f"{'one loss / hand':>17}{'two terms / one loss':>22}")
    for case, k, times in rows:
        median = {loop: statistics.median(t) * 1e3 for loop, t in times.items()}
        print(
            f"{case.name:<6}{k:>3}{median['hand-written']:>12.2f} ms{median['one loss']:>9.2f} ms"
            f"{median['two terms']:>10.2f} ms"
            f"{paired_ratio(times['one loss'], times['hand-written']):>17.3f}"
            f"{paired_ratio(times['two terms'], times['one loss']):>22.3f}"
        )
    print(
        f"times: median {args.clock} time per window over {args.repeats} rotating rounds; "
        "ratios: median over the rounds of the ratio within a round"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
