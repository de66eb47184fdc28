"""Counter-based dropout masks: a keep decision is a hash of who the element is.

A stream is selected by ``(seed, window, layer_id)``, hashed on the host into
the 64-bit key ``K``. Each element is named by a *row* (a sample's global index
in the effective batch, or a token's key) and its index ``e`` within the row;
one 64-bit word is hashed per pair of elements::

    R = splitmix64_finalizer(row * 0x9E3779B97F4A7C15)
    h = splitmix64_finalizer((R + e // 2) * 0x9E3779B97F4A7C15 + K)   (mod 2**64)

The row enters through its own hash ``R``, not through ``row * elements``, so a
sample's mask does not depend on how many elements its row has: a ``(B, T, D)``
input padded to another length ``T`` keeps the mask of every real token
(micro-batches padded to their own longest sequence draw the big batch's
masks). Two rows' words meet only if their ``R`` fall within ``elements / 2``
of each other: a chance of about ``elements / 2**64``.

Element ``e`` reads the 32-bit half ``e % 2`` of ``h`` (low half first) as a
signed int32 ``u`` and is kept iff ``u < round((1 - p) * 2**32) - 2**31``: the
keep rate is ``1 - p`` to within 2**-32. Keyed by token, a token's ``R`` is
``splitmix64_finalizer(document_id * 0x9E3779B97F4A7C15 + position)``. Every
step is exact integer arithmetic (int64 tensor ops that wrap like uint64), so a
mask depends only on these inputs: not on the device, the global RNG, or how
samples are batched or packed.
"""

from __future__ import annotations

from numbers import Real

import torch

from truebatch.nn import cpu_kernels

__all__ = ["keep_mask", "token_keep_mask"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: odd, so counter * _GOLDEN is a bijection
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def signed(value: int) -> int:
    """The int64 with the same 64 bits as ``value`` (torch has no uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _mix64(value: int) -> int:
    """splitmix64 finalizer on a Python int, modulo 2**64."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * _MIX1) & _MASK64
    value = ((value ^ (value >> 27)) * _MIX2) & _MASK64
    return value ^ (value >> 31)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer, in place on an int64 tensor.

    torch int64 multiplication wraps modulo 2**64 like uint64 does, but ``>>``
    is arithmetic (copies the sign bit), so each shift is masked to be logical.
    """
    for shift, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        z.bitwise_xor_((z >> shift).bitwise_and_((1 << (64 - shift)) - 1))
        if multiplier is not None:
            z.mul_(signed(multiplier))
    return z


def stream_key(seed: int, window: int, layer_id: int) -> int:
    """``K`` of one (seed, window, layer) as an int64: distinct inputs give unrelated keys."""
    key = _GOLDEN
    for value in (seed, window, layer_id):
        key = _mix64(key ^ (value & _MASK64))
    return signed(key)


def sample_start(offset: int, key: int) -> tuple[int, int]:
    """The hash inputs of a run of samples: the first one's global index and ``K``."""
    return offset, key


def check_probability(p: object) -> float:
    """Return ``p`` as a float if it is a probability in [0, 1], else raise with the fix."""
    if isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(
            f"`p` got {type(p).__name__} {p!r}; expected a number. Fix: pass the drop "
            "probability, e.g. p=0.1."
        )
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(
            f"`p` got {p}; expected a probability in [0, 1]. Fix: pass the probability of "
            "dropping an element, e.g. p=0.1."
        )
    return float(p)


def keep_count(p: float) -> int:
    """How many of the 2**32 equally likely halves are kept."""
    return round((1.0 - p) * 2**32)


def sample_keep(
    samples: int,
    elements: int,
    p: float,
    start: tuple[int, int] | torch.Tensor,
    device: torch.device | str | None,
) -> torch.Tensor:
    """``(samples, elements)`` keep mask of consecutive samples; ``start`` is
    :func:`sample_start` (a 2-element int64 tensor under ``torch.compile``)."""
    pairs, kept = (elements + 1) // 2, keep_count(p)
    if kept >= 2**32 or samples * pairs == 0:
        return torch.ones(samples, elements, dtype=torch.bool, device=device)
    if torch.compiler.is_compiling():
        assert isinstance(start, torch.Tensor)
        keep = _sample_words_op(start, samples, pairs, kept)
    elif cpu_kernels.serves(device):
        assert not isinstance(start, torch.Tensor)
        keep = torch.ops.truebatch_cpu.sample_keep_words(*start, samples, pairs, kept, 1.0, None)
    else:
        keep = _sample_words(start, samples, pairs, kept, device)
    return keep if 2 * pairs == elements else keep[:, :elements]


def sample_multiplier(
    samples: int,
    elements: int,
    p: float,
    start: tuple[int, int] | torch.Tensor,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dropout's multiplier: :func:`sample_keep` as ``1 / (1 - p)`` (kept) or 0, in ``dtype``
    (written directly by the CPU kernel); ``p < 1``."""
    scale = 1.0 / (1.0 - p)
    pairs, kept = (elements + 1) // 2, keep_count(p)
    on_kernels = not torch.compiler.is_compiling() and cpu_kernels.serves(device)
    if kept < 2**32 and samples * pairs and on_kernels:
        assert not isinstance(start, torch.Tensor)
        words = torch.ops.truebatch_cpu.sample_keep_words(
            *start, samples, pairs, kept, scale, dtype
        )
        return words if 2 * pairs == elements else words[:, :elements]
    return sample_keep(samples, elements, p, start, device).to(dtype).mul_(scale)


def _sample_words(
    start: tuple[int, int] | torch.Tensor,
    samples: int,
    pairs: int,
    kept: int,
    device: torch.device | str | None,
) -> torch.Tensor:
    """``(samples, 2 * pairs)`` keep decisions of samples ``offset, offset + 1, ...``."""
    offset, key = start
    rows = torch.arange(samples, dtype=torch.int64, device=device).add_(offset)
    _mix64_(rows.mul_(signed(_GOLDEN)))
    pair = torch.arange(pairs, dtype=torch.int64, device=device)
    z = (rows.view(-1, 1) + pair).view(-1)
    _mix64_(z.mul_(signed(_GOLDEN)).add_(key))
    return (z.view(torch.int32) < kept - 2**31).view(samples, 2 * pairs)


def _token_words(
    document_ids: torch.Tensor,
    positions: torch.Tensor,
    key: int | torch.Tensor,
    pairs: int,
    kept: int,
) -> torch.Tensor:
    """``(tokens, 2 * pairs)`` keep decisions of the tokens' element pairs."""
    rows = document_ids.reshape(-1, 1).to(torch.int64).mul(signed(_GOLDEN))
    _mix64_(rows.add_(positions.reshape(-1, 1).to(torch.int64)))
    pair = torch.arange(pairs, dtype=torch.int64, device=document_ids.device)
    z = rows.add(pair).view(-1)
    _mix64_(z.mul_(signed(_GOLDEN)).add_(key))
    return (z.view(torch.int32) < kept - 2**31).view(-1, 2 * pairs)


# Under torch.compile the hash runs as these opaque ops, eagerly: the graph keeps no
# int64 arithmetic, which inductor's CPU code generation corrupts (out-of-bounds
# writes on int64 tails, seen with torch 2.13), and no graph break is needed.
@torch.library.custom_op("truebatch::sample_keep_words", mutates_args=())
def _sample_words_op(start: torch.Tensor, samples: int, pairs: int, kept: int) -> torch.Tensor:
    if cpu_kernels.serves(start.device):
        offset, key = start.tolist()  # a CPU tensor: no device sync
        words = torch.ops.truebatch_cpu.sample_keep_words
        return words(offset, key, samples, pairs, kept, 1.0, None)
    return _sample_words(start, samples, pairs, kept, start.device)


@_sample_words_op.register_fake
def _(start: torch.Tensor, samples: int, pairs: int, kept: int) -> torch.Tensor:
    return start.new_empty(samples, 2 * pairs, dtype=torch.bool)


@torch.library.custom_op("truebatch::token_keep_words", mutates_args=())
def _token_words_op(
    document_ids: torch.Tensor, positions: torch.Tensor, key: torch.Tensor, pairs: int, kept: int
) -> torch.Tensor:
    return _token_words(document_ids, positions, key, pairs, kept)


@_token_words_op.register_fake
def _(
    document_ids: torch.Tensor, positions: torch.Tensor, key: torch.Tensor, pairs: int, kept: int
) -> torch.Tensor:
    return document_ids.new_empty(document_ids.numel(), 2 * pairs, dtype=torch.bool)


def token_keep(
    document_ids: torch.Tensor,
    positions: torch.Tensor,
    elements: int,
    p: float,
    key: int | torch.Tensor,
) -> torch.Tensor:
    """``(*document_ids.shape, elements)`` keep mask of tokens; ``key`` is :func:`stream_key`
    (a 0-d int64 tensor under ``torch.compile``)."""
    pairs, kept = (elements + 1) // 2, keep_count(p)
    shape = (*document_ids.shape, elements)
    if kept >= 2**32 or document_ids.numel() * pairs == 0:
        return torch.ones(shape, dtype=torch.bool, device=document_ids.device)
    if torch.compiler.is_compiling():
        assert isinstance(key, torch.Tensor)
        keep = _token_words_op(document_ids, positions, key, pairs, kept)
    else:
        keep = _token_words(document_ids, positions, key, pairs, kept)
    return keep[:, :elements].reshape(shape)


# torch.compiler.disable, applied at the first call: decorating with it imports
# torch._dynamo (seconds per process, as much as torch itself), and this runs only
# under torch.compile, which has imported it.
@torch._disable_dynamo
def start_tensor(
    offset: int, seed: int, window: int, layer_id: int, device: torch.device | None
) -> torch.Tensor:
    """:func:`sample_start` as a 2-element int64 tensor ``[offset, K]``, computed outside
    any compiled graph.

    Under ``torch.compile`` the window (and offset) may be symbolic; the 64-bit
    Python arithmetic cannot be traced on them, so it runs eagerly on their
    values and the graph receives the result as a tensor input: a new window or
    offset neither recompiles nor specializes the graph.
    """
    start = sample_start(offset, stream_key(seed, window, layer_id))
    return torch.tensor(start, dtype=torch.int64, device=device)


def keep_mask(
    samples: int,
    elements: int,
    p: float,
    *,
    seed: int,
    window: int,
    layer_id: int,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean keep mask of ``samples`` consecutive samples; True with probability ``1 - p``.

    Row ``i`` is the sample with global index ``offset + i`` (module docstring):
    the mask of :class:`truebatch.nn.SplitInvariantDropout` on a
    ``(samples, elements)`` input in window ``window``. Works under
    ``torch.compile`` (the key is computed outside the graph, no recompilation
    per window or offset).

    Args:
        samples: number of rows (samples of this micro-batch).
        elements: keep decisions per sample.
        p: drop probability in [0, 1].
        seed: the stream's seed (any int, taken mod 2**64), as ``window`` and ``layer_id``.
        window: the window (optimizer step) index.
        layer_id: separates the masks of different layers.
        offset: global index of the first row's sample in the effective batch.
        device: where the mask is built.

    Returns:
        A bool tensor ``(samples, elements)``.

    Raises:
        ValueError: ``p`` is not in [0, 1] (``TypeError`` if not a number).

    Example::

        >>> keep_mask(4, 10, 0.5, seed=0, window=0, layer_id=0).shape
        torch.Size([4, 10])
    """
    p = check_probability(p)
    if torch.compiler.is_compiling():
        target = None if device is None else torch.device(device)
        start: tuple[int, int] | torch.Tensor = start_tensor(offset, seed, window, layer_id, target)
    else:
        start = sample_start(offset, stream_key(seed, window, layer_id))
    return sample_keep(samples, elements, p, start, device)


def token_keep_mask(
    document_ids: torch.Tensor,
    positions: torch.Tensor,
    elements: int,
    p: float,
    *,
    seed: int,
    window: int,
    layer_id: int,
) -> torch.Tensor:
    """Boolean keep mask keyed by token: ``(*document_ids.shape, elements)``.

    Token ``t`` is named by ``(document_ids[t], positions[t])`` (module
    docstring), not by where it sits in the batch: the same document at another
    row or column, packed with other documents, or split across micro-batches,
    gets the same mask. Works under ``torch.compile``.

    Args:
        document_ids: integer tensor, one id per token, unique per document in the window.
        positions: integer tensor of the same shape, the token's position in its document.
        elements: keep decisions per token.
        p: drop probability in [0, 1].
        seed: the stream's seed, as ``window`` and ``layer_id``.
        window: the window (optimizer step) index.
        layer_id: separates the masks of different layers.

    Returns:
        A bool tensor on ``document_ids.device``.

    Raises:
        ValueError: ``p`` is not in [0, 1] (``TypeError`` if not a number).

    Example::

        >>> ids, pos = torch.tensor([[7, 7, 9]]), torch.tensor([[0, 1, 0]])
        >>> token_keep_mask(ids, pos, 16, 0.1, seed=0, window=0, layer_id=0).shape
        torch.Size([1, 3, 16])
    """
    p = check_probability(p)
    if torch.compiler.is_compiling():
        key: int | torch.Tensor = start_tensor(0, seed, window, layer_id, document_ids.device)[1]
    else:
        key = stream_key(seed, window, layer_id)
    return token_keep(document_ids, positions, elements, p, key)
