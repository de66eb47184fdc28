"""Splitting batches into micro-batches, grouping windows, counting items."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import truebatch as tb

Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Sample:
    x: torch.Tensor
    mask: torch.Tensor
    name: str = "digits"


def shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def test_split_tensor_into_views_with_an_uneven_last_micro_batch() -> None:
    x = torch.arange(20.0).reshape(10, 2)
    parts = tb.split(x, 4)
    assert [p.shape[0] for p in parts] == [4, 4, 2]
    assert torch.equal(torch.cat(parts), x)
    assert all(shares_storage(p, x) for p in parts)
    x[9, 1] = -1.0
    assert parts[-1][1, 1] == -1.0


@pytest.mark.parametrize("size", [None, 10, 11, 1000])
def test_split_returns_the_batch_itself_when_it_fits(size: int | None) -> None:
    batch = {"x": torch.zeros(10, 3)}
    (only,) = tb.split(batch, size)
    assert only is batch


@pytest.mark.parametrize(
    ("batch", "rebuild"),
    [
        ((torch.arange(7), torch.arange(7) * 2), lambda mb: mb),
        ([torch.arange(7), torch.arange(7) * 2], lambda mb: tuple(mb)),
        ({"x": torch.arange(7), "y": torch.arange(7) * 2}, lambda mb: (mb["x"], mb["y"])),
        (Pair(torch.arange(7), torch.arange(7) * 2), lambda mb: (mb.x, mb.y)),
        (Sample(torch.arange(7), torch.arange(7) * 2), lambda mb: (mb.x, mb.mask)),
    ],
    ids=["tuple", "list", "dict", "namedtuple", "dataclass"],
)
def test_split_keeps_the_container_type(batch: Any, rebuild: Any) -> None:
    parts = tb.split(batch, 3)
    assert [type(p) for p in parts] == [type(batch)] * 3
    for i, part in enumerate(parts):
        x, y = rebuild(part)
        expected = torch.arange(3 * i, min(3 * i + 3, 7))
        assert torch.equal(x, expected)
        assert torch.equal(y, expected * 2)


def test_split_nested_batch_passes_non_tensor_leaves_through() -> None:
    names = ["a", "b", "c", "d", "e"]  # no tensor inside: passed whole, not sliced
    batch = {
        "inputs": (torch.randn(5, 3), {"mask": torch.ones(5, 2, dtype=torch.bool)}),
        "meta": {"names": names, "epoch": 3, "nothing": None},
        "sample": Sample(torch.randn(5), torch.zeros(5), name="x"),
    }
    parts = tb.split(batch, 2)
    assert [tb.batch_size(p) for p in parts] == [2, 2, 1]
    for part in parts:
        assert part["meta"]["names"] == names
        assert part["meta"]["epoch"] == 3 and part["meta"]["nothing"] is None
        assert part["sample"].name == "x"
        assert shares_storage(part["inputs"][0], batch["inputs"][0])
    assert torch.equal(parts[2]["inputs"][1]["mask"], batch["inputs"][1]["mask"][4:])


@given(st.integers(1, 60), st.integers(1, 70))
def test_split_sizes_and_order(n: int, micro_batch_size: int) -> None:
    """ceil(n / m) micro-batches of m samples, the remainder last, in order."""
    x = torch.arange(n)
    parts = tb.split(x, micro_batch_size)
    sizes = [len(p) for p in parts]
    remainder = [n % micro_batch_size] if n % micro_batch_size else []
    assert sizes == [micro_batch_size] * (n // micro_batch_size) + remainder
    assert torch.equal(torch.cat(parts), x)


def test_batch_size_and_count_samples() -> None:
    batch = {"x": torch.zeros(6, 2), "y": [torch.zeros(6), "tag"]}
    assert tb.batch_size(batch) == tb.count_samples(batch) == 6


def test_mismatched_leading_dimensions_name_the_leaves() -> None:
    batch = {"x": torch.zeros(6, 2), "y": (torch.zeros(6), torch.zeros(5))}
    with pytest.raises(ValueError, match=r"leading \(batch\) dimension") as error:
        tb.split(batch, 2)
    message = str(error.value)
    assert "batch['y'][1]: 5" in message and "batch['x']: 6" in message


def test_zero_dim_leaves_are_named() -> None:
    with pytest.raises(ValueError, match=r"\['batch\.y'\] are 0-dim tensors"):
        tb.batch_size(Pair(torch.zeros(3), torch.tensor(1.0)))


@pytest.mark.parametrize("batch", [[], {"a": 1, "b": "text"}, "text", None])
def test_batch_without_tensors(batch: Any) -> None:
    with pytest.raises(ValueError, match="holds no tensor"):
        tb.split(batch, 2)


@pytest.mark.parametrize(
    ("size", "error", "words"),
    [
        (0, ValueError, "positive int"),
        (-3, ValueError, "positive int"),
        (2.0, TypeError, "positive int.*float"),
        ("4", TypeError, "positive int.*str"),
        (True, TypeError, "positive int.*bool"),
    ],
)
def test_bad_micro_batch_size(size: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        tb.split(torch.zeros(5), size)


def test_windows_groups_in_order_and_keeps_a_short_last_window() -> None:
    assert list(tb.windows(range(10), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(tb.windows(range(8), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(tb.windows([], 3)) == []


def test_windows_is_lazy() -> None:
    """A DataLoader may be endless: windows pull only what the window needs."""
    pulled: list[int] = []

    def stream():
        for i in range(100):
            pulled.append(i)
            yield i

    first = next(tb.windows(stream(), 3))
    assert first == [0, 1, 2] and pulled == [0, 1, 2]


def test_windows_over_a_dataloader() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10))
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    windows = list(tb.windows(loader, 2))
    assert [[tb.batch_size(mb) for mb in w] for w in windows] == [[3, 3], [3, 1]]


@pytest.mark.parametrize("size", [0, -1, 1.5, True, None])
def test_windows_bad_size(size: Any) -> None:
    with pytest.raises(ValueError, match=r"`windows\(size\)` got .*; expected a positive int"):
        list(tb.windows(range(3), size))


LABELS = torch.tensor([[5, 6, 7, -100], [-100, 2, -100, -100], [1, 2, 3, 4]])


@pytest.mark.parametrize(
    ("counter", "expected"),
    [
        (tb.count_tokens(), 2 + 1 + 3),
        (tb.count_tokens(shift=False), 3 + 1 + 4),
        (tb.count_tokens(ignore_index=7, shift=False), 12 - 1),
        (tb.count_tokens(ignore_index=7), 9 - 1),
    ],
    ids=["shift", "no_shift", "ignore_7_no_shift", "ignore_7_shift"],
)
def test_count_tokens(counter: Any, expected: int) -> None:
    assert int(counter({"labels": LABELS})) == expected


def test_count_tokens_by_key_index_and_dataclass_field() -> None:
    assert int(tb.count_tokens(key=1)((torch.zeros(3, 4), LABELS))) == 6
    assert int(tb.count_tokens(key="mask", shift=False)(Sample(torch.zeros(3), LABELS))) == 8


def test_count_tokens_errors() -> None:
    with pytest.raises(KeyError, match=r"key='labels'.*pass the key or index"):
        tb.count_tokens()({"targets": LABELS})
    with pytest.raises(TypeError, match="expected a tensor, got list"):
        tb.count_tokens()({"labels": [1, 2]})
    with pytest.raises(ValueError, match=r"shape \(batch, seq\).*shift=False"):
        tb.count_tokens()({"labels": torch.tensor([1, 2, -100])})
    assert int(tb.count_tokens(shift=False)({"labels": torch.tensor([1, 2, -100])})) == 2


def test_count_tokens_sums_over_micro_batches_to_the_full_count() -> None:
    """Counting per micro-batch and adding gives the count of the whole batch."""
    labels = torch.randint(-1, 5, (11, 7)).masked_fill_(torch.rand(11, 7) < 0.3, -100)
    batch = {"labels": labels}
    count = tb.count_tokens()
    assert sum(int(count(mb)) for mb in tb.split(batch, 3)) == int(count(batch))
    assert int(count(batch)) == int((labels[:, 1:] != -100).sum())
