"""The python blocks of README.md and docs/*.md run as written, and do what their comments say.

A block leaves some names to the reader (``model``, ``loader``, ``x``) and names machine paths
(``/run/orthoshard.sock``) or a GPU backend. Each block's recipe below supplies those names in a
prelude and swaps those values; every swap must still match the block, so an edited block fails
here until its recipe follows, and a block without a recipe fails
:func:`test_every_python_block_has_a_recipe`. Blocks that call ``init_process_group`` run under a
real ``torchrun`` at two ranks on gloo.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_whole
from test_service_live import Sidecar, start_sidecar

from optim.health import orthogonality_error
from optim.orthogonal import AUTO_MAX_NORM

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)

# A model with the shape the blocks assume: ``model.blocks`` to shard one by one, an embedding
# and a head (routed to AdamW by split_param_groups), hidden matrices (routed to the matrix
# update), and ``model(batch)`` returning a tensor to take ``.mean()`` of. The same seed on every
# rank gives FSDP2 the same initial parameters everywhere, as a real script's seed would.
_MODEL = """
import os
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, h):
        return h + self.fc2(torch.relu(self.fc1(self.norm(h))))

class MyModel(nn.Module):
    def __init__(self, vocab=32, d=16, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h).square()

torch.manual_seed(0)
model = MyModel()
_gen = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
loader = data = [torch.randint(0, 32, (4, 8), generator=_gen) for _ in range(3)]
"""
MATRICES = {f"blocks.{i}.{fc}.weight" for i in range(2) for fc in ("fc1", "fc2")}


@dataclass(frozen=True)
class Recipe:
    """How to run one block: the names it leaves undefined, and machine values to swap."""

    prelude: str = ""
    swaps: tuple[tuple[str, str], ...] = ()


# Keyed by (file, the block's first line): a moved block keeps its recipe, a rewritten first
# line is a new block.
README = ("README.md", "import torch.distributed as dist")
SHARDING = ("docs/sharding.md", "import torch.distributed as dist")
SHARDING_CHECKPOINT = ("docs/sharding.md", "from sharding import checkpoint")
SERVICE = ("docs/service.md", "from service.client import Publisher")
OFT_FUNCTIONS, OFT_LAYER = ("docs/oft.md", "import torch"), ("docs/oft.md", "from torch import nn")
SOAP_GROUPS = ("docs/soap.md", "from optim import SOAP, split_param_groups")
RECIPES: dict[tuple[str, str], Recipe] = {
    README: Recipe(
        prelude=_MODEL,
        swaps=(('init_process_group("nccl")', 'init_process_group("gloo")'),
               ('"/run/orthoshard.sock"', "__import__('os').environ['DOC_UDS']"),
               ('"/run/orthoshard.token"', "__import__('os').environ['DOC_TOKEN_FILE']"))),
    SHARDING: Recipe(prelude=_MODEL),
    # follows the block above, in its process, at the step its load names
    SHARDING_CHECKPOINT: Recipe(prelude="step = 100\n"),
    SERVICE: Recipe(
        prelude=_MODEL + "from optim import Muon, split_param_groups\n"
        "opt = Muon(split_param_groups(model), lr=0.02)\nsteps, rank = 3, 0\n",
        swaps=(('"/run/orthoshard.sock"', "__import__('os').environ['DOC_UDS']"),
               ('"/run/orthoshard.token"', "__import__('os').environ['DOC_TOKEN_FILE']"),
               ("    ...\n", "    model(data[step]).mean().backward()\n"))),
    OFT_FUNCTIONS: Recipe(),
    OFT_LAYER: Recipe(prelude="import torch\nx = torch.randn(2, 4096)\n"),
    SOAP_GROUPS: Recipe(prelude=_MODEL),
}


def python_blocks() -> dict[tuple[str, str], str]:
    blocks = {}
    for doc in DOCS:
        for match in _BLOCK.finditer(doc.read_text()):
            code = match.group(1)
            key = (str(doc.relative_to(ROOT)), code.splitlines()[0])
            assert key not in blocks, f"{key}: two blocks start alike; give each its own line"
            blocks[key] = code
    return blocks


def program(key: tuple[str, str], *, then: tuple[str, str] | None = None) -> str:
    """The block of ``key`` with its recipe applied (and the block ``then`` after it)."""
    recipe, code = RECIPES[key], python_blocks()[key]
    for old, new in recipe.swaps:
        assert old in code, f"{key}: the recipe swaps {old!r}, which the block no longer has"
        code = code.replace(old, new)
    return recipe.prelude + code + (program(then) if then else "")


def test_every_python_block_has_a_recipe() -> None:
    blocks = python_blocks()
    assert set(blocks) == set(RECIPES), (
        f"blocks without a recipe: {sorted(set(blocks) - set(RECIPES))}; recipes without a "
        f"block: {sorted(set(RECIPES) - set(blocks))}")


# Runs a torchrun block as a script, with a line that says which block printed what follows.
# Each block gets ranks of its own: a second default process group set up in the same process
# reuses the first one's store prefix, so gloo could read the torn-down group's addresses and
# both ranks hung in FSDP's first all-gather (2 runs of 3 while other jobs loaded the machine).
# Once every block has run, the ranks leave by os._exit, as docs/sharding.md's "abort at process
# exit" advises. A rank of this runner aborted ("terminate called without an active exception",
# SIGABRT) in one run of the suite on two workers, and its log did not say whether in a block
# or after them: faulthandler now prints where.
_RUNNER = """
import faulthandler, os, runpy, sys
import torch.distributed as dist
faulthandler.enable()  # an abort prints where it happened: in a block or after them all
for path in sys.argv[1:]:
    print(f"=== {path}", flush=True)
    runpy.run_path(path, run_name="__main__")
    if dist.is_initialized():
        dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def _torchrun(tmp: Path, script: Path, env: dict[str, str]) -> str:
    """Two ranks run ``script``; their output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--tee=3", str(tmp / "runner.py"), str(script)]
    proc = run_whole(cmd, timeout=80, cwd=tmp, env=env)  # ~10 s each; two fit the timeout
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@dataclass
class TwoRanks:
    """What the torchrun blocks left: each rank's printed lines per block, the sidecar's view."""

    cwd: Path
    printed: dict[tuple[int, str], list[str]]
    params: dict[str, dict]
    ranks: list[dict]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> TwoRanks:
    tmp = tmp_path_factory.mktemp("torchrun-blocks")
    scripts = []
    for i, (key, then) in enumerate([(README, None), (SHARDING, SHARDING_CHECKPOINT)]):
        scripts.append(tmp / f"block{i}.py")
        scripts[-1].write_text(program(key, then=then))
    (tmp / "runner.py").write_text(_RUNNER)
    car = start_sidecar(tmp)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_GLOO_LAZY_INIT": "1",
               "DOC_UDS": car.uds, "DOC_TOKEN_FILE": str(tmp / "token")}
        stdout = "".join(_torchrun(tmp, script, env) for script in scripts)
        with car.client() as api:
            params = api.get("/v1/params", params={"limit": 100}).json()["items"]
            ranks = api.get("/v1/optimizer").json()["ranks"]
    finally:
        car.stop()
    printed: dict[tuple[int, str], list[str]] = {}
    for line in stdout.splitlines():  # torchrun's --tee prefixes "[rank]:"
        rank, _, text = line.partition("]:")
        r = int(rank.strip("[default"))
        if text.startswith("=== "):
            block = Path(text[4:]).stem
        else:
            printed.setdefault((r, block), []).append(text)
    return TwoRanks(tmp, printed, {p["name"]: p for p in params}, ranks)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_readme_training_loop_publishes_every_matrix_and_checkpoints(
        two_ranks: TwoRanks) -> None:
    # Each rank owns some of the four hidden matrices; the sidecar heard all of them at the last
    # of the loader's three steps (enumerate counts from 0), and both ranks' run ended.
    published = two_ranks.params
    assert MATRICES <= set(published), sorted(published)
    assert {published[m]["step"] for m in MATRICES} == {2}
    assert {published[m]["rank"] for m in MATRICES} == {0, 1}
    assert len(two_ranks.ranks) == 2, two_ranks.ranks
    assert all(r["finished_at"] is not None for r in two_ranks.ranks), two_ranks.ranks
    # step % 1000 == 0 saved at step 0 only, as a DCP checkpoint
    assert (two_ranks.cwd / "ckpt" / "step-0" / ".metadata").is_file()
    assert not (two_ranks.cwd / "ckpt" / "step-1").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_sharding_guide_counts_two_collectives_a_step_and_its_checkpoint_loads(
        two_ranks: TwoRanks) -> None:
    owned = []
    for rank in (0, 1):
        stats, health = map(ast.literal_eval, two_ranks.printed[(rank, "block1")])
        # data holds three batches: the comment's 2 collectives, three times
        assert stats["collectives"] == 6 and stats["bytes_sent"] > 0, stats
        owned.append(set(health))
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == MATRICES, owned
    assert (two_ranks.cwd / "ckpt" / "step-000100" / ".metadata").is_file()


@pytest.mark.multiprocess  # a sidecar process
def test_service_guide_loop_reaches_the_sidecar_and_ends_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    car: Sidecar = start_sidecar(tmp_path)
    try:
        monkeypatch.setenv("DOC_UDS", car.uds)
        monkeypatch.setenv("DOC_TOKEN_FILE", str(tmp_path / "token"))
        monkeypatch.setenv("ORTHOSHARD_RUN_ID", "docs")
        _run_here(SERVICE)
        with car.client() as api:
            params = {p["name"]: p for p in
                      api.get("/v1/params", params={"limit": 100}).json()["items"]}
            ranks = api.get("/v1/optimizer").json()["ranks"]
    finally:
        car.stop()
    assert MATRICES <= set(params) and {params[m]["step"] for m in MATRICES} == {2}
    assert [r["run_id"] for r in ranks] == ["docs"] and ranks[0]["finished_at"], ranks


def _run_here(key: tuple[str, str]) -> dict:
    namespace: dict = {"__name__": "__doc_block__"}
    exec(compile(program(key), f"{key[0]} block", "exec"), namespace)
    return namespace


# The block's comments claim the worst float32 block's orthogonality_error (RMS of R^T R - I) and
# the automatic clip bound; the claims themselves are the bounds (30 seeds at scales 1-30 gave
# at most 1.8e-7 against the "2e-7" written there).
def test_oft_guide_parametrization_is_orthogonal_as_claimed() -> None:
    block = python_blocks()[OFT_FUNCTIONS]
    error_bound = float(re.search(r"error < (\S+)", block).group(1))
    clip_bound = float(re.search(r"auto bound: (\S+) for exp", block).group(1))
    torch.manual_seed(0)
    ns = _run_here(OFT_FUNCTIONS)
    Q, R = ns["Q"], ns["R"]
    assert R.shape == (128, 32, 32)
    assert torch.equal(Q, -Q.transpose(-1, -2))
    assert orthogonality_error(R).max() < error_bound
    assert AUTO_MAX_NORM["exp"] == clip_bound
    assert torch.linalg.matrix_norm(Q, ord=2).max() <= clip_bound


# The merged layer sums x (W R)^T where the adapter sums (x R^T) W^T: float32 sums of 4096
# products in another order, measured 1.9e-6 apart on outputs of size ~2 (rotations at scale 0.3).
OFT_MERGE_ATOL, OFT_MERGE_RTOL = 1e-5, 1e-5
# Rotations at scale 0.3 move the outputs (size ~2) by up to 2.6 (measured): a layer that did not
# rotate stays within float32 rounding (~1e-6) of its base, far below this.
OFT_TURNED_MIN = 1e-2


def test_oft_guide_layer_starts_as_its_base_and_merges_to_itself() -> None:
    torch.manual_seed(0)
    ns = _run_here(OFT_LAYER)
    layer, x = ns["layer"], ns["x"]
    assert torch.equal(ns["y"], layer.base(x))  # "equals base(x) at init": R is exactly I
    assert set(layer.health()) == {"orthogonality_error"}
    with torch.no_grad():  # as after some training
        layer.oft_vector.normal_(0, 0.3)
    merged = layer.merge()
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged(x), layer(x), atol=OFT_MERGE_ATOL, rtol=OFT_MERGE_RTOL)
    assert (layer(x) - layer.base(x)).abs().max() > OFT_TURNED_MIN  # it did rotate


def test_soap_guide_gives_the_hidden_matrices_soap_and_the_rest_adamw() -> None:
    groups = _run_here(SOAP_GROUPS)["opt"].param_groups
    names = {g["algorithm"]: set(g["param_names"]) for g in groups}
    assert names["soap"] == MATRICES, names
    assert {"embed.weight", "head.weight"} <= names["adamw"], names
