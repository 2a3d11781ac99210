"""Routing parameters between the matrix update and the AdamW fallback.

Orthogonalized updates are for hidden weight matrices. Embeddings (a lookup, not a linear map:
rows are updated sparsely and independently), output heads (their scale sets the logits) and
every 1-D parameter (biases, norms' gains) train better with AdamW, as in Muon's reference
set-up. :func:`split_param_groups` makes the two groups most models need; any optimizer of
this package takes them::

    opt = Muon(split_param_groups(model, adamw_lr=3e-4), lr=0.02)

Any group may instead carry ``algorithm="adamw"`` explicitly, with its own ``lr``,
``weight_decay``, ``adamw_betas`` and ``adamw_eps``.

Matrices are taken as ``(out, in)``, as ``nn.Linear`` stores them and ``torch.optim.Muon``
assumes: a weight stored ``(in, out)`` (GPT-2's ``Conv1D``) is stepped transposed, so Muon's
shape-dependent learning-rate scale and NorMuon's per-row (per output neuron) normalization
apply to its other side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["DEFAULT_ADAMW_NAME_PARTS", "split_param_groups"]

# Name fragments that mark embeddings and output heads in common model code (GPT-2 style wte /
# wpe, Hugging Face embed_tokens / lm_head, Llama-style tok_embeddings, a module named "head"),
# and OFT's ``oft_vector`` (optim.oft): a stack of each block's free rotation entries, 2-D but
# no linear map, whose rows Muon would orthogonalize against each other. On a two-layer OFT
# teacher-student problem (64 wide, blocks of 8, 200 steps, 4 learning rates each) AdamW
# reached a loss of 3e-11, Muon 1.9e-5 and SOAP 1.9e-6 at their best.
# Fragments are looked for in "." + name + ".", so one with dots at both ends matches a whole
# dotted component: ".head." is a module named head, not "sa_head" or "multi_head".
DEFAULT_ADAMW_NAME_PARTS: tuple[str, ...] = ("embed", "wte", "wpe", "lm_head", ".head.",
                                             ".oft_vector.")


def split_param_groups(named_parameters: nn.Module | Iterable[tuple[str, Tensor]], *,
                       adamw_name_parts: Sequence[str] = DEFAULT_ADAMW_NAME_PARTS,
                       adamw_lr: float | None = None, adamw_weight_decay: float | None = None,
                       adamw_betas: tuple[float, float] = (0.9, 0.95),
                       adamw_eps: float = 1e-8) -> list[dict[str, Any]]:
    """Split a model's parameters into a matrix group and an AdamW group.

    Pass the model itself (preferred) or ``model.named_parameters()``. A parameter goes to
    AdamW when it is not 2-D (biases, norms, conv filters, stacked experts), is complex (no
    polar factor or eigenbasis update takes those) or its name contains one of
    ``adamw_name_parts``; given the model, also when it is the weight of an ``nn.Embedding`` /
    ``nn.EmbeddingBag`` under any name (minGPT's ``tok_emb``), or when any of the names it is
    shared under matches (a tied embedding and head registered first as T5's or BART's
    ``shared``, which ``named_parameters()`` lists under that name alone). A tensor listed
    under several names is kept once, under its first. Frozen parameters
    (``requires_grad=False``) are left out. Empty groups are dropped. ``adamw_lr`` /
    ``adamw_weight_decay`` default to the optimizer's.

    Fragments are searched in ``"." + name + "."``: ``"embed"`` matches anywhere in the name,
    ``".head."`` only a whole component (``head.weight``, ``model.head.bias``; not
    ``sa_head.weight``). A head under another name (Llama's ``output``, BERT's and ViT's
    ``classifier``, a reward model's ``score``) needs its own fragment, e.g.
    ``adamw_name_parts=(*DEFAULT_ADAMW_NAME_PARTS, ".output.")``: name-based routing cannot
    tell it from a hidden ``attention.output.dense`` matrix of another model.
    """
    if isinstance(adamw_name_parts, str):  # its characters would each be a fragment
        raise ValueError(
            f"adamw_name_parts must be a sequence of name fragments, got the string "
            f"{adamw_name_parts!r}: write ({adamw_name_parts!r},) or "
            f"(*DEFAULT_ADAMW_NAME_PARTS, {adamw_name_parts!r})")
    embeddings: set[int] = set()
    if isinstance(named_parameters, nn.Module):
        embeddings = {id(m.weight) for m in named_parameters.modules()
                      if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        pairs: list[Any] = list(named_parameters.named_parameters(remove_duplicate=False))
    else:
        pairs = list(named_parameters)
    names: dict[int, list[str]] = {}  # every name of each tensor, first seen first
    tensors: dict[int, Tensor] = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], Tensor)):
            raise ValueError(f"split_param_groups takes the model or model.named_parameters() "
                             f"((name, tensor) pairs), got an item of type {type(pair).__name__} "
                             f"(model.parameters() has no names)")
        name, p = pair
        names.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    matrix: list[tuple[str, Tensor]] = []
    fallback: list[tuple[str, Tensor]] = []
    for key, p in tensors.items():
        if not p.requires_grad:
            continue
        to_adamw = p.ndim != 2 or p.is_complex() or key in embeddings or any(
            part in f".{name}." for name in names[key] for part in adamw_name_parts)
        (fallback if to_adamw else matrix).append((names[key][0], p))
    groups: list[dict[str, Any]] = []
    if matrix:
        groups.append({"params": [p for _, p in matrix], "param_names": [n for n, _ in matrix]})
    if fallback:
        group: dict[str, Any] = {"params": [p for _, p in fallback],
                                 "param_names": [n for n, _ in fallback], "algorithm": "adamw",
                                 "adamw_betas": adamw_betas, "adamw_eps": adamw_eps}
        if adamw_lr is not None:
            group["lr"] = adamw_lr
        if adamw_weight_decay is not None:
            group["weight_decay"] = adamw_weight_decay
        groups.append(group)
    return groups
