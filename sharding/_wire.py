"""The exchange's wire: one ``all_to_all_single`` with uneven splits, every block starting with
the sender's status and step signature, then its carried flags, so that a failed rank or ranks
that step different matrices are found out in the same collective
(:class:`sharding.owner.OwnerSharding` runs two a step)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from optim._exchange import MatrixItem, group_settings
from sharding.plan import Plan

__all__ = ["STATUS_ELEMENTS", "Blocks", "agree", "all_to_all", "assemble", "placeholder",
           "send_lists", "signature", "through"]

# Elements each rank puts at the head of every block of both all-to-alls: its status (0: fine,
# 1: it could not prepare its rows, in the gather, or compute its matrices, in the scatter), so
# a failure on one rank reaches every rank without another collective; then the step's
# signature, a CRC-32 of the names of the matrices it steps and of the AdamW parameters whose
# flags it carries, in 8 four-bit pieces (exact in any float dtype the buffers use), so that
# ranks which do not step the same parameters (a gradient None on some ranks only) find out in
# the same collective instead of reading each other's rows as their own. At the head, the
# status lands where the receiver reads it whatever the block's length.
_SIGNATURE_ELEMENTS = 8
STATUS_ELEMENTS = 1 + _SIGNATURE_ELEMENTS


class Blocks(NamedTuple):
    """What :func:`all_to_all` received: the payload per source rank, the ranks that said they
    failed, and the carried flags summed over the ranks (None without any)."""

    received: list[Tensor]
    failed: list[int]
    carried: Tensor | None


def all_to_all(send: list[list[Tensor]], recv_sizes: list[int], device: torch.device,
               wire: torch.dtype, *, failed: bool, carry: Tensor | None = None,
               signature: list[float], group: dist.ProcessGroup | None, rank: int,
               stats: dict[str, int], capacity: list[int] | None = None) -> Blocks:
    """One ``all_to_all_single`` with uneven splits (``recv_sizes``: the payload expected
    from each source). Every block starts with its sender's status (``failed``) and step
    signature, then ``carry``, then the payload. Returns the payload received per source, the
    ranks that said they failed, and ``carry`` summed over the ranks (None without one); raises
    ValueError on a block whose signature differs from this rank's. Consumes ``send``
    (emptied once copied into the one send buffer, so what its pieces view can be freed
    before the collective). ``signature``: this step's (:func:`signature`), ``rank``: this
    rank in ``group``; ``stats`` (``bytes_sent``, ``bytes_received``, ``collectives``) counts
    the collective once it is made, also when a block is then refused.

    ``capacity``: the payload room per source (at least ``recv_sizes``; default: exactly
    those), for a sender that steps matrices this rank does not. gloo fills a longer receive
    with a shorter block, and aborts the process on a block longer than its receive
    ("Received data size doesn't match expected size"); with room for the most any sender of
    the same plan can send, such a block arrives and its signature refuses it. Other backends
    (NCCL's sends and receives pair by size) get exact sizes only."""
    status = torch.tensor([float(failed), *signature], dtype=wire, device=device)
    head = [status, carry.to(device)] if carry is not None else [status]
    extra = sum(t.numel() for t in head)
    for parts in send:
        parts[:0] = head
    posted = [size + extra for size in (capacity or recv_sizes)]
    send_sizes = [sum(p.numel() for p in parts) for parts in send]
    # one copy, cast on the way, into the send buffer (none per destination first)
    inp = torch.empty(sum(send_sizes), dtype=wire, device=device)
    pieces = [p for parts in send for p in parts]
    torch.cat(pieces, out=inp)
    del pieces
    for parts in send:
        parts.clear()
    # every block holds its sender's head, so no receiver reads a status nobody wrote
    out = torch.empty(sum(posted), dtype=wire, device=device)
    dist.all_to_all_single(out, inp, output_split_sizes=posted,
                           input_split_sizes=send_sizes, group=group)
    itemsize = out.element_size()
    others = [r for r in range(len(send_sizes)) if r != rank]
    stats["bytes_sent"] += sum(send_sizes[r] for r in others) * itemsize
    stats["bytes_received"] += sum(recv_sizes[r] + extra for r in others) * itemsize
    stats["collectives"] += 1
    blocks = out.split(posted)
    # summed in rank order, the same on every rank; one host sync for the statuses
    heads = torch.stack([block[:extra] for block in blocks]).to(torch.float64)
    received = heads[:, :STATUS_ELEMENTS]
    mine = status.to(torch.float64)[1:]
    checks = torch.cat([received[:, 0:1], (received[:, 1:] != mine).any(1, keepdim=True)], 1)
    statuses, differ = zip(*checks.tolist(), strict=True)
    if others := [r for r, d in enumerate(differ) if d]:
        raise _mismatch(others, rank)
    carried = heads[:, STATUS_ELEMENTS:].sum(0) if carry is not None else None
    return Blocks([block[extra:extra + size] for block, size in zip(blocks, recv_sizes,
                                                                    strict=True)],
                  [r for r, st in enumerate(statuses) if st != 0], carried)


def _mismatch(others: list[int], rank: int) -> ValueError:
    return ValueError(
        f"ranks {others} of the sharding group do not step the same parameters as rank "
        f"{rank} this step, or not with the same settings (their blocks of the exchange "
        f"differ): every rank must step the same parameters, in the same order, with the same "
        f"param group settings and step counts. Is a gradient None on some ranks only (set to "
        f"None, or a parameter unused in one rank's forward)? Were the optimizers built with "
        f"other arguments, parameters in another order, or loaded from another checkpoint? "
        f"Nothing was applied.")


def agree(carry: Tensor | None, *, failed: bool, signature: list[float], device: torch.device,
          group: dist.ProcessGroup | None, rank: int, world_size: int,
          stats: dict[str, int]) -> tuple[Tensor | None, list[int]]:
    """What :func:`all_to_all`'s heads tell every rank, without the payload: one
    ``all_gather`` of each rank's ``carry``, status (``failed``) and step ``signature``, for a
    step whose matrices are all replicated (no rows to gather), so that every rank knows
    before any owner computes. Returns ``carry`` summed over the ranks (None without one) and
    the ranks that said they failed; raises ValueError (every rank alike) when a rank's
    signature differs from this rank's. Float64: the 0/1 flags and four-bit pieces are exact."""
    mine = torch.tensor([float(failed), *signature], dtype=torch.float64, device=device)
    if carry is not None:
        mine = torch.cat([carry.to(device=device, dtype=torch.float64), mine])
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    stats["bytes_sent"] += (world_size - 1) * mine.nbytes
    stats["bytes_received"] += (world_size - 1) * mine.nbytes
    stats["collectives"] += 1
    rows = torch.stack(gathered)
    tails = rows[:, -STATUS_ELEMENTS:]
    differ = (tails[:, 1:] != mine[-STATUS_ELEMENTS + 1:]).any(1).tolist()
    if others := [r for r, d in enumerate(differ) if d]:
        raise _mismatch(others, rank)
    failed_ranks = [r for r, st in enumerate(tails[:, 0].tolist()) if st != 0]
    carried = rows[:, :-STATUS_ELEMENTS].sum(0) if carry is not None else None
    return carried, failed_ranks


def signature(items: Sequence[MatrixItem], carried: Sequence[str]) -> list[float]:
    """The step's signature (``STATUS_ELEMENTS``' comment): four-bit pieces of a CRC-32 of
    the matrices' names and global shapes in order, their groups' settings
    (:func:`optim._exchange.group_settings`), and what the carried flags belong to (the AdamW
    parameters, with their groups' settings), so that ranks stepping other parameters, or the
    same with other settings, find out. Unnamed parameters are named by position
    (``group0.param1``): listed in another order on one rank, their names agree and their
    shapes tell them apart."""
    settings: dict[int, str] = {}
    lines = []
    for item in items:
        key = id(item.group)
        if key not in settings:
            settings[key] = group_settings(item.group)
        lines.append(f"{item.name} {item.shape} {settings[key]}")
    text = "\n".join([*lines, "--", *carried])
    return name_signature(text)


def name_signature(text: str) -> list[float]:
    """Four-bit pieces of the CRC-32 of ``text``."""
    crc = zlib.crc32(text.encode())
    return [float((crc >> (4 * k)) & 0xF) for k in range(_SIGNATURE_ELEMENTS)]


def placeholder(n: int, wire: torch.dtype, device: torch.device) -> Tensor:
    """``n`` zeros to send in place of a payload this rank does not have (one element, viewed
    ``n`` times: no new memory)."""
    return torch.zeros(1, dtype=wire, device=device).expand(n)


def through(t: Tensor, wire: torch.dtype) -> Tensor:
    """``t`` as it would arrive through a ``wire`` buffer: itself when ``wire`` holds its dtype
    exactly, else rounded to ``wire`` and back (a replicated matrix then matches a sharded one)."""
    if torch.promote_types(t.dtype, wire) == wire:
        return t
    return t.to(wire).to(t.dtype)


def assemble(plan: Plan, inputs: Sequence[Tensor], owned: list[int], received: list[Tensor],
             wire: torch.dtype) -> list[Tensor]:
    """Each owned matrix's full update input, in its own dtype (one process computes on that
    dtype: Muon's softening blend, SOAP's float64 state): a sharded one from its rows as they
    arrived in ``received`` (one block per source rank, consumed), in source rank order; a
    replicated one as this rank holds it, as it would cross the wire."""
    full = []
    for i in owned:
        if not plan.sharded[i]:
            full.append(through(inputs[i], wire))
            continue
        pieces = []
        for s in range(plan.world_size):
            size = plan.rows_of(i, s) * plan.shapes[i][1]
            pieces.append(received[s][:size])
            received[s] = received[s][size:]
        full.append(torch.cat(pieces).view(plan.shapes[i]).to(inputs[i].dtype))
    return full


def send_lists(plan: Plan, owned: list[int], results: list[Tensor] | None, wire: torch.dtype,
               device: torch.device) -> list[list[Tensor]]:
    """Per destination rank, the pieces of the scatter: its rows of each owned sharded result,
    the whole of a replicated one. Consumes ``results`` (cleared: the views in the lists keep
    them until the send buffer holds them); None (this rank failed): placeholders of the same
    sizes, no new memory."""
    send: list[list[Tensor]] = [[] for _ in range(plan.world_size)]
    for k, i in enumerate(owned):
        for d in range(plan.world_size):
            start, end = plan.bounds[i][d]
            if results is None:
                rows = end - start if plan.sharded[i] else plan.shapes[i][0]
                send[d].append(placeholder(rows * plan.shapes[i][1], wire, device))
                continue
            result = results[k]
            send[d].append(result[start:end].reshape(-1) if plan.sharded[i]
                           else result.reshape(-1))
    if results is not None:
        results.clear()
    return send
