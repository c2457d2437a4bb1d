"""`ScoreModel` takes everything that depends on its prior's kind from one strategy object
(`priors.PriorKind`: `DDPMPrior`, score_sde's DDPM under the VP-SDE, or `FamilyPrior`, a checkpoint
family's), chosen once in the constructor: it never branches on the kind (issue 23, item 4).

- the source scan: no condition in `ScoreModel` reads the prior's kind (`self.prior`, `prior_kind`,
  `pretrained_family`, `family`, the kinds' classes), and it reaches the strategy only through
  `PriorKind`'s interface;
- both strategies implement that interface on real networks (the DDPM and each family's fixture);
- a third, made-up strategy drives a `ScoreModel` through training losses, scores, frozen copies, the data
  scale and the pretrained import: the model needs nothing but the interface.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAMILY_CHECKPOINTS, TINY_MODEL, slice_sample
from torch import nn
from torch.utils.data import default_collate

from diffusion.networks.families import load_pretrained
from diffusion.sampling.sde import VPSDE, ScoreFn
from lightning_modules import module
from lightning_modules.module import LossConfig, OptimConfig, ScoreModel
from lightning_modules.priors import DDPMPrior, FamilyPrior, PretrainedSource, PriorKind

pytestmark = pytest.mark.usefixtures("one_thread")

#: names whose appearance in a condition means a branch on the prior's kind (its attributes, the kinds'
#: classes and those of their networks and SDEs)
KIND_NAMES = {"prior", "prior_kind", "pretrained_family", "family", "DDPMPrior", "FamilyPrior", "PriorKind",
              "Pretrained", "DDPM", "VPSDE", "VESDE", "DiscreteVPSDE"}


def _interface() -> set[str]:
    """`PriorKind`'s public members: its annotated attributes, properties and methods."""
    members = {name for name in vars(PriorKind) if not name.startswith("_")}
    return members | set(PriorKind.__annotations__)


def kind_branches(source: str) -> list[str]:
    """The conditions in `source` (if / conditional expression / while / assert / comprehension filter /
    match) that read the prior's kind (`KIND_NAMES`), unparsed, in source order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = list(node.ifs)
        elif isinstance(node, ast.Match):
            tests = [node.subject]
        else:
            continue
        for test in tests:
            names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)}
            if names & KIND_NAMES:
                found.append((test.lineno, test.col_offset, ast.unparse(test)))
    return [text for *_, text in sorted(found)]


def _score_model_source() -> str:
    return textwrap.dedent(inspect.getsource(ScoreModel))


def test_the_scan_finds_branches_on_the_kind() -> None:
    branchy = ("def f(self, pretrained_family):\n"
               "    if self.prior is None:\n        pass\n"
               "    x = 1 if pretrained_family is not None else 2\n"
               "    assert isinstance(self.prior_kind, FamilyPrior)\n"
               "    y = [v for v in w if self.prior_kind.family]\n"
               "    if self.hparams.dsm_weight > 0:\n        pass\n")
    assert kind_branches(branchy) == ["self.prior is None", "pretrained_family is not None",
                                      "isinstance(self.prior_kind, FamilyPrior)", "self.prior_kind.family"]


def test_score_model_never_branches_on_the_prior_kind() -> None:
    assert kind_branches(_score_model_source()) == []


def test_score_model_reaches_the_strategy_only_through_the_interface() -> None:
    tree = ast.parse(Path(module.__file__).read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "prior_kind"}
    assert used and used <= _interface(), used - _interface()
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"DDPMPrior", "FamilyPrior", "family_prior", "DDPM", "VPSDE"}  # nothing kind-specific


# ------------------------------------------------------------------------------------ the two strategies
def _kinds() -> list[tuple[str, dict[str, Any]]]:
    families = [(family, dict(pretrained=PretrainedSource(str(path), family=family)))
                for family, path in FAMILY_CHECKPOINTS.items()]
    return [("ddpm", dict(TINY_MODEL)), *families]


@pytest.mark.parametrize(("name", "kwargs"), _kinds(), ids=[name for name, _ in _kinds()])
def test_both_strategies_implement_the_interface(name: str, kwargs: dict[str, Any]) -> None:
    model = ScoreModel(**kwargs)
    kind = model.prior_kind
    assert isinstance(kind, DDPMPrior if name == "ddpm" else FamilyPrior)
    assert not inspect.isabstract(type(kind)) and PriorKind.__abstractmethods__
    assert model.net is kind.network and model.sde is kind.sde and model.prior is kind.pretrained
    recorded = model.hparams.pretrained or {"family": None, "config": None}  # (None: no pretrained block)
    assert recorded["family"] == kind.family == (None if name == "ddpm" else name)
    assert recorded["config"] == kind.config
    assert model.train_size == kind.train_size and isinstance(kind.train_size, int)
    size = kind.train_size
    x, t = torch.randn(2, 2, size, size), torch.tensor([0.3, 0.7])
    copy = kind.new_network("cpu")
    assert copy is not kind.network and copy.state_dict().keys() == kind.network.state_dict().keys()
    copy.load_state_dict(kind.network.state_dict())
    kind.network.eval()
    copy.eval()
    assert torch.equal(kind.score_of(copy)(x, t), kind.score_of(kind.network)(x, t))
    assert kind.score_of(copy)(x, t).shape == x.shape
    if kind.loss_score_fn is not None:  # (None: the losses' own score_sde convention, the DDPM's)
        assert torch.equal(kind.loss_score_fn(x, t), kind.score_of(kind.network)(x, t))
    k = torch.randn(2, size, size, dtype=torch.complex64)
    assert kind.data_scale is None or kind.data_scale(k, None).shape == (2,)
    if name != "ddpm":
        kind.load_pretrained()
        ref = load_pretrained(FAMILY_CHECKPOINTS[name], family=name)
        ours = kind.network.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in ref.network.state_dict().items())


def test_a_detected_family_is_recorded_for_the_checkpoint() -> None:
    model = ScoreModel(pretrained=PretrainedSource(str(FAMILY_CHECKPOINTS["hfs_sde"])))
    assert isinstance(model.prior_kind, FamilyPrior) and model.hparams.pretrained["family"] == "hfs_sde"
    assert isinstance(model.hparams.pretrained["config"], dict)  # the resolved config: rebuilds alone


# ---------------------------------------------------------------------- a third kind: the interface alone
class _Conv(nn.Module):
    """A one-layer 'score network' called as `net(x, labels)`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * labels[:, None, None, None]


class _StubPrior(PriorKind):
    """A made-up kind of prior: counts what the model asks of it."""

    def __init__(self, source: PretrainedSource) -> None:
        self.network, self.sde, self.source = _Conv(), VPSDE(), source
        self.family, self.config = None, {"stub": True}
        self.calls: list[str] = []

    @property
    def pretrained(self) -> None:
        return None

    @property
    def train_size(self) -> int:
        return 8

    @property
    def data_scale(self) -> Any:
        self.calls.append("data_scale")
        return lambda kspace, noise_sigma=None: torch.full((kspace.shape[0],), 2.0)

    @property
    def loss_score_fn(self) -> ScoreFn:
        self.calls.append("loss_score_fn")
        return self.score_of(self.network)

    def score_of(self, net: nn.Module) -> ScoreFn:
        return lambda x, t: net(x, torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]))

    def new_network(self, device: torch.device | str) -> nn.Module:
        self.calls.append("new_network")
        return _Conv().to(device)

    def load_pretrained(self) -> None:
        self.calls.append("load_pretrained")
        nn.init.ones_(self.network.conv.weight)


def test_score_model_runs_on_any_prior_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "prior_kind", lambda net, source, *args: _StubPrior(source))
    model = ScoreModel(pretrained=PretrainedSource("stub.ckpt", config={"stub": True}),
                       loss=LossConfig(supervised_weight=1.0), optim=OptimConfig(warmup_steps=1))
    stub = model.prior_kind
    assert isinstance(stub, _StubPrior) and stub.source == PretrainedSource("stub.ckpt", config=stub.config)
    assert model.net is stub.network and model.train_size == 8
    assert model.hparams.pretrained["config"] == stub.config
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 2, 8, 8, generator=g)
    batch = default_collate([slice_sample(clean[i], clean[i] + 0.1, i) for i in range(2)])
    losses = model._losses(batch, torch.Generator().manual_seed(1), compute_all=True)
    assert set(losses) == {"dsm", "supervised", "loss"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert stub.network.conv.weight.grad is not None
    model.on_fit_start()  # the pretrained import, then the EMA restarted from those weights
    assert torch.equal(stub.network.conv.weight, torch.ones_like(stub.network.conv.weight))
    assert torch.equal(model.ema.shadow_params[0], stub.network.conv.weight.detach())
    x, t = torch.randn(1, 2, 8, 8), torch.tensor([0.5])
    assert torch.allclose(model.score_fn(use_ema=False)(x, t), stub.network(x, t).detach())
    assert model.data_scale is not None
    assert {"data_scale", "loss_score_fn", "new_network", "load_pretrained"} <= set(stub.calls)
