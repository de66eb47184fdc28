"""Splitting batches into micro-batches, grouping windows, counting items."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict, UserDict, defaultdict, namedtuple
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import truebatch as tb
from truebatch.compare import TOLERANCES

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


def test_split_nested_batch_cuts_per_sample_lists_and_shares_the_rest() -> None:
    names = ["a", "b", "c", "d", "e"]  # one per sample: cut with the rows
    labels = ["cat", "dog"]  # another length: a setting, given whole
    batch = {
        "inputs": (torch.randn(5, 3), {"mask": torch.ones(5, 2, dtype=torch.bool)}),
        "meta": {"names": names, "labels": labels, "epoch": 3, "nothing": None},
        "sample": Sample(torch.randn(5), torch.zeros(5), name="x"),
    }
    parts = tb.split(batch, 2)
    assert [tb.batch_size(p) for p in parts] == [2, 2, 1]
    assert [p["meta"]["names"] for p in parts] == [["a", "b"], ["c", "d"], ["e"]]
    for part in parts:
        assert part["meta"]["labels"] is labels
        assert part["meta"]["epoch"] == 3 and part["meta"]["nothing"] is None
        assert part["sample"].name == "x"
        assert shares_storage(part["inputs"][0], batch["inputs"][0])
    assert torch.equal(parts[2]["inputs"][1]["mask"], batch["inputs"][1]["mask"][4:])
    assert names == ["a", "b", "c", "d", "e"]  # the batch is not changed


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
    with pytest.raises(ValueError, match=r"different leading \(batch\) dimensions") as error:
        tb.split(batch, 2)
    message = str(error.value)
    assert "batch['y'][1]: 5" in message and "batch['x']: 6" in message


def test_zero_dim_leaves_are_named() -> None:
    with pytest.raises(ValueError, match=r"\['batch\.y'\] got 0-dim tensors"):
        tb.batch_size(Pair(torch.zeros(3), torch.tensor(1.0)))


@pytest.mark.parametrize("batch", [[], {"a": 1, "b": "text"}, "text", None])
def test_batch_without_tensors(batch: Any) -> None:
    with pytest.raises(ValueError, match="holds no tensor"):
        tb.split(batch, 2)


@pytest.mark.parametrize(
    ("size", "error", "words"),
    [
        (0, ValueError, "got 0 .int.; expected a positive int"),
        (-3, ValueError, "got -3 .int.; expected a positive int"),
        (2.0, TypeError, "got 2.0 .float.; expected a positive int"),
        ("4", TypeError, "got '4' .str.; expected a positive int"),
        (True, TypeError, "got True .bool.; expected a positive int"),
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
    with pytest.raises(KeyError, match=r"`key` got 'labels', which the micro-batch"):
        tb.count_tokens()({"targets": LABELS})
    with pytest.raises(TypeError, match="got 'labels', a list; expected a tensor"):
        tb.count_tokens()({"labels": [1, 2]})
    with pytest.raises(ValueError, match=r"expected \(batch, seq\).*shift=False"):
        tb.count_tokens()({"labels": torch.tensor([1, 2, -100])})
    assert int(tb.count_tokens(shift=False)({"labels": torch.tensor([1, 2, -100])})) == 2


def test_count_tokens_sums_over_micro_batches_to_the_full_count() -> None:
    """Counting per micro-batch and adding gives the count of the whole batch."""
    labels = torch.randint(-1, 5, (11, 7)).masked_fill_(torch.rand(11, 7) < 0.3, -100)
    batch = {"labels": labels}
    count = tb.count_tokens()
    assert sum(int(count(mb)) for mb in tb.split(batch, 3)) == int(count(batch))
    assert int(count(batch)) == int((labels[:, 1:] != -100).sum())


# ---------------------------------------------------------------------------
# Mappings: dict, OrderedDict, defaultdict, UserDict (transformers' BatchEncoding)


class Features(UserDict):
    """A UserDict subclass with attribute access and an attribute of its own."""

    def __init__(self, data: dict, source: str = "loader") -> None:
        super().__init__(data)
        self.source = source

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None


class ReadOnly(Mapping):
    """An immutable mapping built from a dict."""

    def __init__(self, data: dict) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class Unbuildable(ReadOnly):
    def __init__(self, data: dict, tag: str) -> None:
        super().__init__(data)
        self.tag = tag


def _rows(n: int) -> dict[str, torch.Tensor]:
    return {"x": torch.arange(n * 2.0).reshape(n, 2), "y": torch.arange(n)}


@pytest.mark.parametrize(
    "make",
    [
        OrderedDict,
        lambda d: defaultdict(list, d),
        UserDict,
        lambda d: Features(d, source="disk"),
        ReadOnly,
        MappingProxyType,
    ],
    ids=["OrderedDict", "defaultdict", "UserDict", "UserDict_subclass", "Mapping", "proxy"],
)
def test_split_any_mapping_keeps_its_type_and_cuts_its_tensors(make: Any) -> None:
    batch = make(_rows(5))
    parts = tb.split(batch, 2)
    assert [type(p) for p in parts] == [type(batch)] * 3
    assert [tb.batch_size(p) for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert torch.equal(torch.cat([p["y"] for p in parts]), batch["y"])
    assert list(parts[0]) == list(batch)
    assert tb.batch_size(batch) == 5 and tb.count_samples(batch) == 5


def test_split_mapping_keeps_defaultdict_factory_and_user_attributes() -> None:
    factory = defaultdict(lambda: "missing", _rows(4))
    features = Features(_rows(4), source="disk")
    for part in tb.split(factory, 3):
        assert part["absent"] == "missing"
    for part in tb.split(features, 3):
        assert part.source == "disk" and torch.equal(part.x, part["x"])
    assert "absent" not in features and features.x.shape == (4, 2)


def test_mapping_that_cannot_be_rebuilt_is_named() -> None:
    with pytest.raises(TypeError, match=r"`batch` got a Unbuildable, a read-only mapping"):
        tb.split(Unbuildable(_rows(4), "t"), 2)


# ---------------------------------------------------------------------------
# Per-sample values that are not tensors (issue 15, defect 5)


def test_default_collate_strings_are_cut_with_their_rows() -> None:
    samples = [{"x": torch.tensor([float(i)]), "name": f"s{i}"} for i in range(7)]
    batch = torch.utils.data.default_collate(samples)
    assert batch["name"] == [f"s{i}" for i in range(7)]
    for part in tb.split(batch, 3):
        assert part["name"] == [f"s{int(v)}" for v in part["x"].flatten()]


def test_zip_collated_tuples_are_per_sample() -> None:
    """``tuple(zip(*samples))``: a tuple of tensors (a container) and a tuple of strings."""
    samples = [(torch.tensor([float(i)]), f"s{i}", {"id": i}) for i in range(5)]
    xs, names, metas = tuple(zip(*samples, strict=True))
    batch = (torch.stack(xs), names, metas)
    for part in tb.split(batch, 2):
        rows = [int(v) for v in part[0].flatten()]
        assert part[1] == tuple(f"s{i}" for i in rows)
        assert part[2] == tuple({"id": i} for i in rows)
        assert type(part[1]) is tuple


def test_per_sample_lists_follow_their_rows_at_any_depth() -> None:
    batch = Pair(
        torch.arange(6),
        {"tokens": [["w"] * i for i in range(6)], "tag": "run-3", "few": ["a", "b"]},
    )
    parts = tb.split(batch, 4)
    assert [p.y["tokens"] for p in parts] == [[["w"] * i for i in range(4)], [["w"] * 4, ["w"] * 5]]
    assert all(p.y["tag"] == "run-3" and p.y["few"] == ["a", "b"] for p in parts)


def test_a_list_of_b_numbers_is_refused_with_how_to_mark_it() -> None:
    batch = {"x": torch.zeros(2, 3), "betas": (0.9, 0.999)}
    with pytest.raises(ValueError, match=r"`batch\['betas'\]` got a tuple of 2 numbers") as error:
        tb.split(batch, 1)
    assert "tb.shared(batch['betas'])" in str(error.value)
    assert "torch.as_tensor(batch['betas'])" in str(error.value)
    assert tb.split(batch, 2) == [batch]  # not cut: nothing to decide


def test_shared_marks_a_setting_of_b_entries() -> None:
    batch = {
        "x": torch.zeros(2, 3),
        "betas": tb.shared((0.9, 0.999)),
        "langs": tb.shared(["en", "fr"]),
    }
    for part in tb.split(batch, 1):
        assert part["betas"] == (0.9, 0.999) and part["langs"] == ["en", "fr"]
        assert isinstance(part["betas"], tuple) and isinstance(part["langs"], list)
    with pytest.raises(TypeError, match="`value` got str; expected a list, a tuple or a numpy"):
        tb.shared("en")
    with pytest.raises(TypeError, match="`value` got Pair"):
        tb.shared(Pair(1, 2))


def test_numpy_arrays_follow_the_same_rule() -> None:
    """Rows of strings are per sample; B numbers are refused; other lengths are shared."""
    names = np.array(["a", "b", "c"])
    counts = np.arange(3)
    weights = np.ones(5)
    batch = {"x": torch.arange(3), "names": names, "weights": weights, "scale": np.float64(2.0)}
    parts = tb.split(batch, 2)
    assert [p["names"].tolist() for p in parts] == [["a", "b"], ["c"]]
    assert all(p["weights"] is weights and p["scale"] == 2.0 for p in parts)
    with pytest.raises(ValueError, match=r"`batch\['counts'\]` got a numpy array of 3 numbers"):
        tb.split({**batch, "counts": counts}, 2)
    marked = tb.split({**batch, "counts": tb.shared(counts)}, 2)
    assert all(np.array_equal(p["counts"], counts) for p in marked)
    with pytest.raises(ValueError, match=r"`batch\['ids'\]` got a list of 3 numbers"):
        tb.split({**batch, "ids": [np.int64(1), np.int64(2), np.int64(3)]}, 2)


def test_a_shared_list_of_tensors_is_given_whole() -> None:
    prototypes = tb.shared([torch.zeros(3, 2), torch.ones(3, 2)])
    batch = {"x": torch.zeros(5, 2), "prototypes": prototypes}
    assert tb.batch_size(batch) == 5
    parts = tb.split(batch, 2)
    assert all(p["prototypes"] is prototypes for p in parts)
    assert [p["x"].shape[0] for p in parts] == [2, 2, 1]


def test_namedtuple_is_always_a_container() -> None:
    """A namedtuple of B numbers is a record of settings, never per-sample values."""
    settings = Pair(0.5, 0.25)
    parts = tb.split((torch.zeros(2, 1), settings), 1)
    assert [p[1] for p in parts] == [settings, settings]


def test_per_sample_strings_weight_the_loss_through_the_accumulator() -> None:
    """Each sample's loss is weighted by its own name's length: misaligned names
    (every micro-batch getting all of them) would change the gradient or fail."""
    g = torch.Generator().manual_seed(3)
    names = ["a", "bb", "ccc", "dddd", "e", "ff", "ggg"]
    samples = [
        {"x": torch.randn(4, generator=g, dtype=torch.float64), "y": i % 3, "name": names[i]}
        for i in range(7)
    ]
    batch = torch.utils.data.default_collate(samples)
    model = nn.Linear(4, 3).double()
    reference = copy.deepcopy(model)

    def weighted(model: nn.Module, batch: dict, reduction: str) -> torch.Tensor:
        weights = torch.tensor([len(n) for n in batch["name"]], dtype=torch.float64)
        losses = weights * F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
        return losses.sum() if reduction == "sum" else losses.mean()

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    tb.Accumulator(model, optimizer, micro_batch_size=3).step(
        batch, lambda m, b: weighted(m, b, "sum")
    )
    weighted(reference, batch, "mean").backward()
    with torch.no_grad():
        expected = [p - p.grad for p in reference.parameters()]
    assert tb.max_relative_difference(model.parameters(), expected) <= TOLERANCES[torch.float64]
