"""PowerEMA (EDM2's power-function EMA) and fastavg.posthoc (EDM2's Algorithm 3).

Every backend against a float64 transcription of the paper's rule on the same trajectory of θ; snapshots
(written off the training thread) against the averages they were taken from; synthesis against a float64
transcription of Algorithm 3 and against ema-pytorch's ``solve_weights``. The backends against the
reference on every layout, and the bit-exact resume, run with helpers' ``power_ema`` averager in
test_backends_vs_reference.py, test_triton.py, test_cuda.py and test_state_dict.py.
"""
import os
import pickle

import pytest
import torch

import fastavg
from fastavg import posthoc, reference
from fastavg.averaging import sigma_rel_to_gamma

from helpers import IMPLS, impl_params, make_params, set_grads

SIGMAS = (0.05, 0.1, 0.2)
STEPS = 60
TOL = dict(rtol=1e-5, atol=1e-5)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _build(impl, params, average):
    if impl == "spec":
        return reference.SGD(params, lr=0.05, momentum=0.9, average=average)
    return fastavg.SGD(params, lr=0.05, momentum=0.9, average=average, backend=impl)


def _gamma64(sigma_rel):
    """γ as EDM2's code computes it: the largest real root of the cubic, by numpy."""
    np = pytest.importorskip("numpy")
    s = sigma_rel**-2
    return float(np.roots([1, 7, 16 - s, 12 - s]).real.max())


def _transcription(thetas, gamma):
    """EDM2's rule in float64 on the recorded θ_1..θ_T: e ← β_t e + (1 − β_t) θ_t, β_t = (1 − 1/t)^(γ+1)."""
    average = thetas[0].double().clone()  # β_1 = 0: the first step copies θ_1
    for t, theta in enumerate(thetas[1:], start=2):
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        average = beta * average + (1.0 - beta) * theta.double()
    return average


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.29])
def test_gamma_is_the_largest_root_of_edm2s_cubic(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(_gamma64(sigma_rel), rel=1e-12, abs=1e-12)
    assert ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5 == pytest.approx(sigma_rel, rel=1e-12)


def test_weights_are_one_minus_beta_and_the_first_step_copies():
    average = fastavg.PowerEMA(SIGMAS)
    assert average.plan(1).weights == (1.0, 1.0, 1.0)
    for t in (2, 3, 10, 1000, 10**7):
        expected = tuple(1.0 - (1.0 - 1.0 / t) ** (g + 1.0) for g in average.gamma)
        assert average.plan(t).weights == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_profiles_match_a_float64_transcription(impl, dtype):
    params = impl_params(impl, 33, dtype) + impl_params(impl, 7, dtype, seed=1)
    opt = _build(impl, params, fastavg.PowerEMA(SIGMAS))
    thetas = []
    for step in range(STEPS):
        set_grads(params, step)
        opt.step()
        thetas.append([p.detach().clone() for p in params])
    for k, sigma in enumerate(SIGMAS):
        gamma = _gamma64(sigma)
        for i, average in enumerate(opt.averaged_parameters(k)):
            expected = _transcription([theta[i] for theta in thetas], gamma)
            torch.testing.assert_close(average.double(), expected, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_snapshots_hold_the_profiles_and_their_header(impl, tmp_path):
    params = impl_params(impl, "many", torch.float32)[:20]
    average = fastavg.PowerEMA(SIGMAS[:2], snapshot_every=3, snapshot_dir=tmp_path)
    opt = _build(impl, params, average)
    expected = {}
    for step in range(10):
        set_grads(params, step)
        opt.step()
        if (step + 1) % 3 == 0:
            expected[step + 1] = [[a.to("cpu", copy=True) for a in opt.averaged_parameters(k)] for k in range(2)]
    average.flush()
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"power_ema-t{t:09d}-sigma{s!r}.pt" for t in (3, 6, 9) for s in SIGMAS[:2])
    for t, profiles in expected.items():
        for k, sigma in enumerate(SIGMAS[:2]):
            record = torch.load(tmp_path / f"power_ema-t{t:09d}-sigma{sigma!r}.pt", weights_only=True)
            assert (record["step"], record["sigma_rel"], record["profile"]) == (t, sigma, k)
            assert record["gamma"] == sigma_rel_to_gamma(sigma)
            assert len(record["params"]) == len(params)
            for saved, live in zip(record["params"], profiles[k]):
                assert saved.dtype == torch.float32 and torch.equal(saved, live)


def _train_with_snapshots(tmp_path, steps=40, every=4, impl="spec"):
    params = impl_params(impl, 17, torch.float32) + impl_params(impl, 5, torch.float32, seed=1)
    average = fastavg.PowerEMA(SIGMAS[:2], snapshot_every=every, snapshot_dir=tmp_path)
    opt = _build(impl, params, average)
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    average.flush()
    return opt


def _algorithm3_float64(snapshot_dir, sigma_rel, step):
    """EDM2's Algorithm 3 in numpy float64, written from the paper, on the files themselves."""
    np = pytest.importorskip("numpy")
    records = [torch.load(os.path.join(snapshot_dir, name), weights_only=True) for name in os.listdir(snapshot_dir)]
    records = sorted((r for r in records if r["step"] <= step), key=lambda r: (r["step"], r["sigma_rel"]))
    t_i = np.array([r["step"] for r in records], dtype=np.float64)
    g_i = np.array([_gamma64(r["sigma_rel"]) for r in records], dtype=np.float64)

    def p_dot_p(t_a, g_a, t_b, g_b):
        t_ratio = t_a / t_b
        t_exp = np.where(t_a < t_b, g_b, -g_a)
        t_max = np.maximum(t_a, t_b)
        return (g_a + 1) * (g_b + 1) * t_ratio**t_exp / ((g_a + g_b + 1) * t_max)

    a = p_dot_p(t_i[:, None], g_i[:, None], t_i[None, :], g_i[None, :])
    b = p_dot_p(t_i[:, None], g_i[:, None], np.float64(step), np.float64(_gamma64(sigma_rel)))
    x = np.linalg.solve(a, b)[:, 0]
    out = [sum(w * r["params"][i].double().numpy() for w, r in zip(x, records)) for i in range(len(records[0]["params"]))]
    return out, x, np.linalg.cond(a)


@pytest.mark.parametrize("sigma_rel, step", [(0.08, None), (0.15, None), (0.03, 24), (0.1, 30)])
def test_synthesis_matches_a_float64_transcription_of_algorithm3(tmp_path, sigma_rel, step):
    _train_with_snapshots(tmp_path)
    target = 40 if step is None else step
    expected, x, cond = _algorithm3_float64(tmp_path, sigma_rel, target)
    used, coefficients, at = posthoc.coefficients(tmp_path, sigma_rel, step)
    assert at == target and len(used) == len(x)
    # Both solve the same system in float64: they agree to its conditioning.
    torch.testing.assert_close(coefficients, torch.from_numpy(x), rtol=1e-13 * cond, atol=1e-13 * cond)
    synthesized = posthoc.synthesize(tmp_path, sigma_rel, step)
    scale = float(abs(x).sum())  # the fp32 snapshots are combined with these weights
    for ours, theirs in zip(synthesized, expected):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), torch.from_numpy(theirs), rtol=1e-5, atol=1e-6 * scale)


def test_synthesis_coefficients_match_ema_pytorchs_solve_weights(tmp_path):
    solve_weights = pytest.importorskip("ema_pytorch.post_hoc_ema").solve_weights
    _train_with_snapshots(tmp_path)
    used, coefficients, step = posthoc.coefficients(tmp_path, 0.08)
    t_i, gamma_i, t_r, gamma_r = (torch.tensor(values, dtype=torch.float64) for values in (
        [s.step for s in used], [s.gamma for s in used], [step], [sigma_rel_to_gamma(0.08)]))
    theirs = solve_weights(t_i, gamma_i, t_r, gamma_r)[:, 0]
    torch.testing.assert_close(coefficients, theirs, rtol=1e-9, atol=1e-9)


def test_synthesizing_a_tracked_profile_at_a_snapshot_returns_that_snapshot(tmp_path):
    # The target is then one of the basis profiles: the least-squares solution is that snapshot alone.
    opt = _train_with_snapshots(tmp_path)
    used, coefficients, _ = posthoc.coefficients(tmp_path, SIGMAS[1])
    expected = torch.zeros(len(used), dtype=torch.float64)
    expected[-1] = 1.0
    torch.testing.assert_close(coefficients, expected, rtol=0, atol=1e-8)
    for ours, average in zip(posthoc.synthesize(tmp_path, SIGMAS[1]), opt.averaged_parameters(1)):
        torch.testing.assert_close(ours, average, rtol=1e-6, atol=1e-6)


def test_cli_writes_the_synthesized_state(tmp_path):
    _train_with_snapshots(tmp_path / "snapshots", steps=12)
    out = tmp_path / "ema.pt"
    posthoc.main([str(tmp_path / "snapshots"), "--sigma-rel", "0.08", "--out", str(out)])
    saved = torch.load(out, weights_only=True)
    assert (saved["sigma_rel"], saved["step"], len(saved["snapshots"])) == (0.08, 12, 6)
    for a, b in zip(saved["params"], posthoc.synthesize(tmp_path / "snapshots", 0.08)):
        assert torch.equal(a, b)


def test_an_averager_with_a_writer_pickles_and_its_copy_writes_its_own_snapshots(tmp_path):
    opt = _train_with_snapshots(tmp_path, steps=8)
    clone = pickle.loads(pickle.dumps(opt.average))
    assert clone.config() == opt.average.config() and clone.snapshot_dir == opt.average.snapshot_dir
    clone.after_step(12, opt.averaged_parameters)
    clone.flush()
    assert os.path.exists(tmp_path / f"power_ema-t{12:09d}-sigma{SIGMAS[0]!r}.pt")


def test_a_failed_write_raises_on_the_training_thread(tmp_path):
    params = make_params(7, torch.float32)
    average = fastavg.PowerEMA(0.1, snapshot_every=1, snapshot_dir=tmp_path / "gone")
    opt = fastavg.SGD(params, lr=0.1, average=average)
    os.rmdir(tmp_path / "gone")
    set_grads(params, 0)
    opt.step()
    with pytest.raises((OSError, RuntimeError), match="gone"):
        average.flush()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sigma_rel=0.35), ValueError, r"sigma_rel must be in \(0, 0.3\)"),
    (dict(sigma_rel=0.0), ValueError, "sigma_rel must be in"),
    (dict(sigma_rel="0.1"), TypeError, "sigma_rel must be a float"),
    (dict(sigma_rel=(0.1, 0.1)), ValueError, "sigma_rel has a value twice"),
    (dict(sigma_rel=tuple(0.01 * k for k in range(1, 10))), ValueError, "1 to 8 floats"),
    (dict(snapshot_every=10), ValueError, "snapshot_every and snapshot_dir go together"),
    (dict(snapshot_every=0, snapshot_dir="x"), ValueError, "snapshot_every must be >= 1"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastavg.PowerEMA(**kwargs)


def test_snapshot_dir_that_is_a_file_raises(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="snapshot_dir=.*is not a directory"):
        fastavg.PowerEMA(snapshot_every=1, snapshot_dir=tmp_path / "file")


def test_synthesize_checks_its_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no power_ema"):
        posthoc.synthesize(tmp_path, 0.1)
    _train_with_snapshots(tmp_path, steps=8)
    with pytest.raises(ValueError, match=r"step must be in \[1, 8\]"):
        posthoc.synthesize(tmp_path, 0.1, step=9)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        posthoc.synthesize(tmp_path, 0.5)
