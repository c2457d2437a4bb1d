"""`degradations.Measurement`: the measurement owns its operator (A and its exact adjoint, built in one place,
its norm), its noise level has one home and a stated origin (recorded / given / estimated), and nothing
outside `degradations` builds an operator by hand."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from helpers import REPO

from degradations import ForwardOperator, Measurement, make_regime, neutral_params
from lfmri_utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

#: the only modules that may build a ForwardOperator from parameters or by its constructor
OPERATOR_BUILDERS = {"degradations/measurement.py", "degradations/operator.py"}


def _phantom(n: int = 3, h: int = 20, w: int = 24) -> torch.Tensor:
    """Smooth complex test images [n,1,h,w] (ellipses of different sizes with a phase ramp)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    imgs = [((xx / (0.5 + 0.1 * i)) ** 2 + (yy / 0.7) ** 2 < 1).float() * torch.exp(1j * 0.5 * xx)
            for i in range(n)]
    return torch.stack(imgs)[:, None].to(torch.complex64)


def _simulated(regime: str = "noise_blur_t2star_b0", snr_db: float = 10.0, seed: int = 0, n: int = 3,
               **overrides: object) -> tuple[Measurement, dict[str, torch.Tensor]]:
    degradation = make_regime(regime, snr_db=snr_db, **overrides)
    y, params = degradation(_phantom(n), torch.Generator().manual_seed(seed))
    return Measurement.simulated(y, params, degradation), params


def _operator_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in params.items() if k != "noise_sigma"}


# ------------------------------------------------------------------------------------------- the operator
@pytest.mark.parametrize("b0_method", ["segmented", "exact"])
def test_the_operator_and_its_adjoint_are_adjoint(b0_method: str) -> None:
    """<A x, k> = <x, A^H k> for random complex x, k (complex128), blur, T2* and B0 all present."""
    m, _ = _simulated(b0_method=b0_method, b0_max_hz=60.0)
    A = m.operator()
    assert not A.is_diagonal
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m.y.shape, generator=g, dtype=torch.complex128)
    k = torch.randn(m.y.shape, generator=g, dtype=torch.complex128)
    lhs = (A.forward(x).conj() * k).sum(dim=(1, 2, 3))
    rhs = (x.conj() * A.adjoint(k)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-8)


def test_the_operator_norm_matches_the_dense_operators_largest_singular_value() -> None:
    """`operator_norm_sq` (power iteration) against the spectral norm of A written out as a dense matrix on a
    tiny slice (every column is A applied to one pixel)."""
    m, _ = _simulated(n=2, b0_method="exact", b0_max_hz=80.0, fwhm_px=1.5)
    m = Measurement.from_kspace(m.y[:, :, :6, :8].contiguous(), {
        k: v[..., :6, :8] if v.dim() == 4 else v for k, v in m.params.items()}, m.noise_sigma, "recorded",
        m.b0_method)
    A = m.operator()
    n_pixels = 6 * 8
    basis = torch.eye(n_pixels, dtype=torch.complex128).reshape(n_pixels, 1, 1, 6, 8)
    for i in range(len(m)):
        slice_op = m.operator(slice(i, i + 1))
        dense = torch.stack([slice_op.forward(e).flatten() for e in basis], dim=1)  # [H*W, H*W]
        exact = float(torch.linalg.matrix_norm(dense, ord=2)) ** 2
        estimate = float(m.operator_norm_sq(slice(i, i + 1), iterations=300)[0])
        assert estimate == pytest.approx(exact, rel=1e-3)
        assert float(m.operator_norm_sq(iterations=300)[i]) == pytest.approx(exact, rel=1e-3)
    assert A.encoding is not None


@pytest.mark.parametrize("b0_method", ["segmented", "exact"])
def test_the_operator_honours_every_realised_parameter_and_the_b0_method(b0_method: str) -> None:
    m, params = _simulated()
    x = _phantom().to(torch.complex128)
    measured = Measurement.from_kspace(m.y, m.params, m.noise_sigma, "recorded", b0_method)
    torch.testing.assert_close(measured.operator().forward(x),
                               ForwardOperator.from_params(params, b0_method).forward(x))
    other = "exact" if b0_method == "segmented" else "segmented"
    assert not torch.equal(measured.operator().forward(x),
                           Measurement.from_kspace(m.y, m.params, m.noise_sigma, "recorded", other)
                           .operator().forward(x))


def test_the_simulator_and_the_measurement_build_the_same_operator() -> None:
    """One function builds A: the regime's `operator` and the measurement's agree bit for bit, with the
    regime's B0 settings (here the exact method) carried by `Measurement.simulated`."""
    degradation = make_regime("noise_blur_t2star_b0", b0_method="exact")
    y, params = degradation(_phantom(), torch.Generator().manual_seed(3))
    m = Measurement.simulated(y, params, degradation)
    assert (m.b0_method, m.noise_origin) == ("exact", "recorded") and "noise_sigma" not in m.params
    x = _phantom().to(torch.complex128)
    assert torch.equal(m.operator().forward(x), degradation.operator(params).forward(x))


def test_the_data_term_scales_the_kspace_and_the_noise_but_not_the_operator() -> None:
    m, _ = _simulated("noise_blur")
    c = torch.tensor([2.0, 3.0])
    A, y, sigma = m.data_term(slice(1, 3), "cpu", c)
    torch.testing.assert_close(y, m.y[1:3] * c[:, None, None, None])
    torch.testing.assert_close(sigma, m.noise_sigma[1:3] * c)
    x = _phantom()[1:3]
    torch.testing.assert_close(A.forward(x), m.operator(slice(1, 3)).forward(x))


# ---------------------------------------------------------------------------------------- the noise level
def test_the_noise_level_is_recorded_given_or_estimated() -> None:
    m, params = _simulated("noise_blur", snr_db=5.0)
    assert m.noise_origin == "recorded"
    torch.testing.assert_close(m.noise_sigma, params["noise_sigma"].float())
    given = Measurement.from_kspace(m.y, m.params, 0.25)
    assert given.noise_origin == "given" and given.noise_sigma.tolist() == [0.25] * 3
    estimated = Measurement.from_kspace(m.y, m.params)
    assert estimated.noise_origin == "estimated"
    for i in range(3):
        assert math.isclose(float(estimated.noise_sigma[i]), float(params["noise_sigma"][i]), rel_tol=0.25)


def test_an_empty_slice_takes_the_stacks_noise_level_and_an_empty_stack_is_refused() -> None:
    m, _ = _simulated("noise")
    y = m.y.clone()
    y[1] = 0
    sigma = Measurement.from_kspace(y, m.params).noise_sigma
    assert float(sigma[1]) == float(sigma[[0, 2]].median())
    with pytest.raises(InputError, match="noise level"):
        Measurement.from_kspace(torch.zeros_like(y), m.params)


def test_the_noise_level_has_one_home() -> None:
    """params never carry a noise level; a known one is finite and >= 0, and only "recorded" or "given"."""
    y = torch.ones(2, 1, 8, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match="params must not hold noise_sigma"):
        Measurement.from_kspace(y, neutral_params(2, 8, 8), 0.1)
    params = _operator_params(neutral_params(2, 8, 8))
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(InputError, match="finite and >= 0"):
            Measurement.from_kspace(y, params, bad)
    with pytest.raises(ValueError, match="'recorded' or 'given'"):
        Measurement.from_kspace(y, params, 0.1, "estimated")
    with pytest.raises(ValueError, match="one value or"):
        Measurement.from_kspace(y, params, torch.ones(3))


# ---------------------------------------------------------------------------------------- the guard rails
def operator_builders(root: Path) -> list[str]:
    """`path:line` of every call of `<anything>.from_params(...)` or `ForwardOperator(...)` in the Python
    files under `root` outside tests/ (and hidden folders such as virtual environments), except in
    `OPERATOR_BUILDERS`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("tests", "runs") or any(p.startswith(".") for p in rel.parts) \
                or rel.as_posix() in OPERATOR_BUILDERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "from_params") or \
                    (isinstance(func, ast.Name) and func.id == "ForwardOperator"):
                found.append(f"{rel.as_posix()}:{node.lineno}")
    return found


def test_only_the_measurement_module_builds_forward_operators() -> None:
    assert operator_builders(REPO) == []


def test_the_operator_guard_finds_a_hand_built_operator(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bad.py").write_text(
        "from degradations import ForwardOperator\n\n"
        "def a(params):\n    return ForwardOperator.from_params(params)\n\n"
        "def b():\n    return ForwardOperator(None)\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "fine.py").write_text("ForwardOperator.from_params({})\n")
    assert operator_builders(tmp_path) == ["pkg/bad.py:4", "pkg/bad.py:7"]


def diffusion_imports(path: Path) -> list[str]:
    """The modules of `diffusion` or `lightning_modules` the file at `path` imports (any form of import)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [n for n in names if n.split(".")[0] in ("diffusion", "lightning_modules")]


def test_the_classical_baselines_import_nothing_of_the_diffusion_code(tmp_path: Path) -> None:
    assert diffusion_imports(REPO / "lfmri" / "baselines.py") == []
    bad = tmp_path / "bad.py"
    bad.write_text("import diffusion.inference\nfrom lightning_modules import sampling\n")
    assert diffusion_imports(bad) == ["diffusion.inference", "lightning_modules"]
