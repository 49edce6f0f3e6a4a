"""DDIM encoding, reconstruction and latent interpolation on the Gaussian oracle, and the
command line's errors for guidance and control flags."""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion import cli
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.guidance import GuidanceError
from ipu_diffusion.diffusion.oracle import gaussian_oracle
from ipu_diffusion.diffusion.schedules import make_betas
from ipu_diffusion.inference.control import (ENCODE_MIN_ALPHA_BAR, decode, encode,
                                           encoding_timesteps, interpolate, reconstruct)

MU, SD = 0.3, 0.2


def _setup():
    d = GaussianDiffusion(make_betas("linear", 1000))
    return d, gaussian_oracle(d, MU, SD)


def test_reconstruct_round_trip():
    d, oracle = _setup()
    x0 = MU + SD * tf.random.stateless_normal([64, 4, 4, 1], [3, 4]).numpy()
    # DDIM inversion is first order (eps from the previous level, Song et al. 2021 sec. 4.3),
    # so the round-trip MSE falls like 1/steps^2; measured (levels up to alpha_bar = 1e-3):
    # 10 steps 1.9e-2, 50 steps 1.4e-3, 200 steps 1.0e-4 (Var(x0) = 0.04)
    coarse, fine = reconstruct(d, oracle, x0, steps=50), reconstruct(d, oracle, x0, steps=200)
    assert fine["mse"].mean() < 3e-4 and coarse["mse"].mean() < 4e-3
    assert coarse["mse"].mean() > 8 * fine["mse"].mean()
    assert fine["latents"].shape == x0.shape
    assert abs(fine["latents"].std() - 1.0) < 0.08  # latents look like N(0, I)


def test_interpolation_endpoints_are_the_encoded_latents():
    d, oracle = _setup()
    a = MU + SD * tf.random.stateless_normal([4, 4, 1], [5, 0]).numpy()
    b = MU + SD * tf.random.stateless_normal([4, 4, 1], [5, 1]).numpy()
    out = interpolate(d, oracle, a, b, frames=5, steps=20)
    z = encode(d, oracle, np.stack([a, b]), 20).numpy()
    np.testing.assert_allclose(out["latents"][0], z[0], atol=1e-5)
    np.testing.assert_allclose(out["latents"][-1], z[1], atol=1e-5)
    np.testing.assert_allclose(out["images"][[0, -1]], decode(d, oracle, z, 20).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["alphas"], [0, 0.25, 0.5, 0.75, 1.0])
    norms = np.linalg.norm(out["latents"].reshape(5, -1), axis=1)
    assert np.all(norms[1:-1] > 0.9 * norms[[0, -1]].min())  # slerp keeps the norm (lerp would not)
    with pytest.raises(GuidanceError, match="--frames"):
        interpolate(d, oracle, a, b, frames=1, steps=20)
    with pytest.raises(GuidanceError, match="--steps"):
        encode(d, oracle, a[None], 0)


@pytest.mark.parametrize("argv,message", [
    (["sample", "--workdir", "W", "--scale", "2"], "--scale: needs --guidance"),
    (["sample", "--workdir", "W", "--classifier", "C"], "--classifier: only used with --guidance"),
    (["sample", "--workdir", "W", "--guidance", "classifier"], "needs --classifier DIR"),
    (["sample", "--workdir", "W", "--guidance", "classifier", "--classifier", "/nonexistent"],
     "holds no classifier.json"),
    (["train-classifier", "--config", "pipeline_configs/digits.yaml", "--workdir", "W",
      "--set", "model.num_classes=0", "--set", "data.use_labels=false"], "model.num_classes: 0"),
])
def test_cli_flag_errors_are_one_clear_line(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / a) if a in ("W", "C") else a for a in argv]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--workdir", "W", "--guidance", "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_encoding_stops_where_alpha_bar_is_still_invertible():
    for schedule, top in (("linear", 824), ("cosine", 978)):
        d = GaussianDiffusion(make_betas(schedule, 1000))
        kept = encoding_timesteps(d, 50)
        assert kept[0] == 0 and kept[-1] == top and len(set(kept)) == 50
        assert d.alphas_cumprod[top] >= ENCODE_MIN_ALPHA_BAR > d.alphas_cumprod[top + 1]
    with pytest.raises(GuidanceError, match=r"--steps: must be an integer in \[1, 979\]"):
        encoding_timesteps(d, 1000)
