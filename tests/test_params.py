"""split_param_groups routing and the AdamW fallback group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optim import Muon, NorMuon, split_param_groups


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 16)
        self.hidden = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Linear(32, 16, bias=False)
        self.lm_head = nn.Linear(16, 20, bias=False)
        self.frozen = nn.Linear(16, 16, bias=False)
        self.frozen.weight.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.norm(torch.relu(self.hidden(self.embed(tokens)))))
        return self.lm_head(h + self.frozen(h))


MATRIX = ["hidden.weight", "mlp.weight"]
ADAMW = ["embed.weight", "hidden.bias", "norm.weight", "norm.bias", "lm_head.weight"]


def test_split_routes_1d_embeddings_and_heads_to_adamw_and_drops_frozen():
    groups = split_param_groups(TinyLM().named_parameters(), adamw_lr=3e-4,
                                adamw_weight_decay=0.0)
    assert len(groups) == 2
    matrix, fallback = groups
    assert matrix["param_names"] == MATRIX and "algorithm" not in matrix
    assert fallback["param_names"] == ADAMW
    assert fallback["algorithm"] == "adamw"
    assert (fallback["lr"], fallback["weight_decay"]) == (3e-4, 0.0)
    assert fallback["adamw_betas"] == (0.9, 0.95) and fallback["adamw_eps"] == 1e-8


def _routes(groups: list[dict]) -> dict[str, str]:
    return {name: group.get("algorithm", "matrix") for group in groups
            for name in group["param_names"]}


def test_given_the_model_embeddings_go_to_adamw_by_type_and_tied_weights_by_any_name():
    # minGPT's tok_emb (no "embed" in the name) and T5 / BART's ``shared`` embedding tied to
    # the encoder's embed_tokens and the lm_head went to the matrix update: named_parameters()
    # lists a tied tensor under its first name alone
    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(10, 8)
            self.encoder = nn.Module()
            self.encoder.embed_tokens = self.shared
            self.tok_emb = nn.Embedding(12, 8)
            self.bag = nn.EmbeddingBag(9, 8)
            self.fc = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.lm_head.weight = self.shared.weight

    model = Seq2Seq()
    assert _routes(split_param_groups(model)) == {
        "fc.weight": "matrix", "shared.weight": "adamw", "tok_emb.weight": "adamw",
        "bag.weight": "adamw", "fc.bias": "adamw"}
    # the names alone: tied by a matching alias, listed once under its first name (it was put
    # in both groups, which torch refused without naming it)
    routes = _routes(split_param_groups(model.named_parameters(remove_duplicate=False)))
    assert routes["shared.weight"] == "adamw" and "lm_head.weight" not in routes
    assert routes["tok_emb.weight"] == "matrix"  # (no module to tell its type)
    Muon(split_param_groups(model), lr=0.02)  # each tensor in one group, by one name


def test_parameters_without_names_are_refused_naming_the_fix():
    # an error from tuple unpacking, or, with a first dim of 2, each tensor split into rows
    for params in (nn.Linear(4, 3).parameters(), nn.Linear(8, 2).parameters()):
        with pytest.raises(ValueError, match=r"model.parameters\(\) has no names"):
            split_param_groups(params)


def test_an_unnamed_adamw_group_may_join_named_groups_in_the_constructor():
    # torch refused "all optimizer param groups should be with/without names" although
    # add_param_group took the same group
    hidden, emb = nn.Linear(8, 8), nn.Embedding(10, 8)
    opt = Muon([*split_param_groups(hidden.named_parameters()),
                {"params": [emb.weight], "algorithm": "adamw"}], lr=0.02)
    assert [g["param_names"] for g in opt.param_groups] == [["weight"], ["bias"],
                                                             ["group2.param0"]]


def test_split_without_overrides_inherits_the_optimizer_lr_and_drops_empty_groups():
    (only,) = split_param_groups([("w", nn.Parameter(torch.zeros(3, 4)))])
    assert "lr" not in only and only["param_names"] == ["w"]
    (fallback,) = split_param_groups([("b", nn.Parameter(torch.zeros(3)))])
    assert fallback["algorithm"] == "adamw" and "lr" not in fallback
    opt = Muon(split_param_groups([("b", nn.Parameter(torch.zeros(3)))]), lr=0.01)
    assert opt.param_groups[0]["lr"] == 0.01


def test_split_sends_complex_matrices_to_adamw():
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))
    matrix, fallback = split_param_groups([("w", nn.Parameter(torch.zeros(4, 4))), ("z", z)])
    assert matrix["param_names"] == ["w"] and fallback["param_names"] == ["z"]
    Muon([matrix, fallback], lr=0.01)  # accepted: the matrix groups refuse complex ones


def test_custom_name_parts_choose_what_goes_to_adamw():
    groups = split_param_groups(TinyLM().named_parameters(), adamw_name_parts=("mlp",))
    assert groups[0]["param_names"] == ["embed.weight", "hidden.weight", "lm_head.weight"]
    assert "mlp.weight" in groups[1]["param_names"]


def test_head_matches_a_whole_name_component_only():
    # "head." used to match inside "sa_head.weight" and "multi_head.proj.weight": hidden
    # matrices went to AdamW
    names = ["head.weight", "model.head.weight", "sa_head.weight", "multi_head.proj.weight",
             "heads.0.weight", "tok_embeddings.weight", "lm_head.weight"]
    matrix, fallback = split_param_groups(
        [(name, nn.Parameter(torch.zeros(4, 4))) for name in names])
    assert matrix["param_names"] == ["sa_head.weight", "multi_head.proj.weight", "heads.0.weight"]
    assert fallback["param_names"] == ["head.weight", "model.head.weight",
                                       "tok_embeddings.weight", "lm_head.weight"]
    # a head under another name takes a fragment of its own
    (fallback,) = split_param_groups([("output.weight", nn.Parameter(torch.zeros(4, 4)))],
                                     adamw_name_parts=(".output.",))
    assert fallback["param_names"] == ["output.weight"]


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_adamw_group_matches_torch_adamw_on_those_params(opt_cls):
    ours_model, ref_model = TinyLM(), TinyLM()
    opt = opt_cls(split_param_groups(ours_model.named_parameters(), adamw_lr=3e-3,
                                     adamw_weight_decay=0.05), lr=0.02)
    ref_named = dict(ref_model.named_parameters())
    ref = torch.optim.AdamW([ref_named[n] for n in ADAMW], lr=3e-3, betas=(0.9, 0.95),
                            eps=1e-8, weight_decay=0.05, foreach=False)
    ours_named = dict(ours_model.named_parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        # injected gradients: a backward pass would differ once the matrices (Muon) moved
        for name in ADAMW + MATRIX:
            grad = torch.randn(ours_named[name].shape, generator=g)
            ours_named[name].grad = grad.clone()
            ref_named[name].grad = grad.clone()
        opt.step()
        ref.step()
    for name in ADAMW:
        # same functional adam call (foreach=False) on identical gradients: bit for bit
        assert torch.equal(ours_named[name], ref_named[name]), name
    # the matrices moved under Muon, not AdamW (the reference never touched them)
    for name in MATRIX:
        assert not torch.equal(ours_named[name], ref_named[name]), name
    assert set(opt.health()) == set(MATRIX)


@pytest.mark.parametrize(("name", "shape"), [("bias", (8,)), ("conv.weight", (4, 3, 3, 3)),
                                             ("scalar", ())])
def test_non_2d_param_in_matrix_group_names_it_and_the_fix(name, shape):
    bad = nn.Parameter(torch.zeros(shape))
    with pytest.raises(ValueError) as info:
        Muon([("w", nn.Parameter(torch.zeros(4, 4))), (name, bad)])
    message = str(info.value)
    assert repr(name) in message and str(tuple(shape)) in message
    assert "algorithm='adamw'" in message and "split_param_groups" in message


def test_unknown_group_algorithm_is_rejected():
    with pytest.raises(ValueError, match="algorithm"):
        Muon([{"params": [nn.Parameter(torch.zeros(2, 2))], "algorithm": "sgd"}])


def test_a_bare_string_of_name_parts_is_refused():
    # iterated letter by letter, "lm_head" sent every parameter with an l, m, _, h, e, a or d
    # in its name to AdamW, and the "Muon" run had no matrix left
    with pytest.raises(ValueError, match=r"write \('lm_head',\)"):
        split_param_groups(TinyLM().named_parameters(), adamw_name_parts="lm_head")
    groups = split_param_groups(TinyLM().named_parameters(), adamw_name_parts=("lm_head",))
    assert groups[0]["param_names"] == ["embed.weight", "hidden.weight", "mlp.weight"]


@pytest.mark.parametrize("opt_cls, key, value", [
    (Muon, "betas", (0.5, 0.6)), (Muon, "momentum", 0.5), (Muon, "eps", 1e-3),
    (NorMuon, "nesterov", False),
])
def test_an_adamw_group_refuses_the_matrix_optimizers_keys(opt_cls, key, value):
    # AdamW reads adamw_betas / adamw_eps: these were accepted and silently ignored
    bias = nn.Parameter(torch.zeros(4))
    group = {"params": [bias], "param_names": ["bias"], "algorithm": "adamw", key: value}
    w = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=rf"sets '{key}'.*adamw_betas=\(beta1, beta2\)"):
        opt_cls([{"params": [w], "param_names": ["w"]}, group])
    opt = opt_cls([{"params": [w], "param_names": ["w"]}])
    with pytest.raises(ValueError, match=rf"sets '{key}'"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1


def test_a_meta_parameter_is_named_at_step():
    w = nn.Parameter(torch.empty(4, 4, device="meta"))
    w.grad = torch.empty(4, 4, device="meta")
    opt = Muon([("w", w)])
    with pytest.raises(RuntimeError, match=r"'w' is on the meta device.*to_empty"):
        opt.step()


def test_a_head_under_another_name_joins_adamw_with_the_fragments_the_readme_shows() -> None:
    import optim  # the README's spelling: the defaults come from the package itself

    model = nn.Sequential()
    model.add_module("hidden", nn.Linear(8, 8, bias=False))
    model.add_module("classifier", nn.Linear(8, 3, bias=False))
    default = {g.get("algorithm", "matrix"): g["param_names"]
               for g in split_param_groups(model)}
    assert default == {"matrix": ["hidden.weight", "classifier.weight"]}
    groups = split_param_groups(
        model, adamw_name_parts=(*optim.DEFAULT_ADAMW_NAME_PARTS, ".classifier."))
    routed = {g.get("algorithm", "matrix"): g["param_names"] for g in groups}
    assert routed == {"matrix": ["hidden.weight"], "adamw": ["classifier.weight"]}


def test_oft_vectors_go_to_adamw():
    # 2-D, so they went to the matrix update, which orthogonalized the blocks' free rotation
    # entries against each other (see DEFAULT_ADAMW_NAME_PARTS for what that cost)
    from optim.oft import OFTConfig, OFTLinear

    model = nn.Sequential(OFTLinear(nn.Linear(16, 16), config=OFTConfig(block_size=4)),
                          nn.Linear(16, 16, bias=False))
    assert _routes(split_param_groups(model)) == {"0.oft_vector": "adamw", "1.weight": "matrix"}
    assert _routes(split_param_groups(model.named_parameters())) == {
        "0.oft_vector": "adamw", "1.weight": "matrix"}
