"""FID plumbing with small feature extractors (no test downloads Inception weights)."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from typer.testing import CliRunner

import ddim_cli.fid as fid
from ddim_cli.cli import app
from ddim_cli.compare import SamplerSpec, paper_fid


def small_extractor(images: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and std and a coarse 2x2 pooling: enough to tell image sets apart."""
    x = images.float() / 255
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), pooled], 1).double()


def random_images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(120 + shift, 40, (n, 8, 8, 3)), 0, 255).astype(np.uint8)


def stats_of(images):
    return fid.statistics(iter([images[:50], images[50:]]), small_extractor)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    images = random_images(200, 0)
    base = stats_of(images)
    assert fid.frechet_distance(base, base) == pytest.approx(0, abs=1e-6)
    shifted = [fid.frechet_distance(base, stats_of(random_images(200, 1, shift))) for shift in (0, 20, 60)]
    assert shifted[0] < shifted[1] < shifted[2] and shifted[2] > 5 * shifted[0]


def test_frechet_distance_matches_scipy_on_known_gaussians():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    value = fid.frechet_distance({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2})
    assert value == pytest.approx(expected, rel=1e-8)
    # Diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2 in closed form.
    d1, d2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    same_mean = fid.frechet_distance({"mu": np.zeros(3), "sigma": d1}, {"mu": np.zeros(3), "sigma": d2})
    assert same_mean == pytest.approx(1 + 0 + 4, rel=1e-10)


def test_sources_folder_npz_and_statistics_files(tmp_path):
    images = random_images(12, 5)
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "pngs" / f"{i:03d}.png")
    np.savez(tmp_path / "images.npz", images)
    from_folder = fid.reference_statistics(tmp_path / "pngs", small_extractor, 5)
    from_npz = fid.reference_statistics(tmp_path / "images.npz", small_extractor, 4)
    np.testing.assert_allclose(from_folder["mu"], from_npz["mu"], rtol=1e-12)
    np.testing.assert_allclose(from_folder["sigma"], from_npz["sigma"], rtol=1e-10)
    fid.save_statistics(from_npz, tmp_path / "stats.npz")
    cached = fid.reference_statistics(tmp_path / "stats.npz", small_extractor, 4)
    assert fid.frechet_distance(cached, from_folder) == pytest.approx(0, abs=1e-8)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "is not a folder of images"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no images"),
        (lambda p: np.savez(p / "x.npz", other=np.zeros(3)) or p / "x.npz", "neither arr_0"),
        (lambda p: np.savez(p / "f.npz", np.zeros((2, 4, 4, 3))) or p / "f.npz", "must be uint8"),
        # Files that once came out as internal errors: text, a .npy under an .npz name, object arrays.
        (lambda p: (p / "t.npz").write_text("text") and p / "t.npz", "is not an .npz archive"),
        (lambda p: np.save(p / "a.npy", np.zeros(3)) or (p / "a.npy").rename(p / "a.npz"), "is not an .npz archive"),
        (lambda p: np.savez(p / "o.npz", np.array([{}], dtype=object)) or p / "o.npz", "Object arrays cannot be"),
        (lambda p: np.savez(p / "s.npz", mu=np.zeros(3), sigma=np.zeros(3)) or p / "s.npz", r"sigma \(D, D\)"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, make, message):
    with pytest.raises(fid.FIDError, match=message):
        fid.reference_statistics(make(tmp_path), small_extractor, 4)


def test_a_missing_named_dataset_is_not_downloaded(tmp_path):
    with pytest.raises(fid.FIDError, match="pass --download"):
        fid.reference_statistics("cifar10", small_extractor, 4, data_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_fid_command_and_cached_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "inception_extractor", lambda weights=None, device="cpu": small_extractor)
    np.savez(tmp_path / "a.npz", random_images(40, 0))
    np.savez(tmp_path / "b.npz", random_images(40, 1, 30))
    runner = CliRunner()
    first = runner.invoke(
        app,
        [
            "fid",
            str(tmp_path / "a.npz"),
            str(tmp_path / "b.npz"),
            "--save-stats",
            str(tmp_path / "ref.npz"),
            "--no-progress",
        ],
    )
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "ref.npz"), "--no-progress"])

    def value(output):
        return next(line.split()[1] for line in output.splitlines() if line.startswith("FID "))

    assert again.exit_code == 0 and value(first.output) == value(again.output)
    assert (tmp_path / "ref.npz").is_file() and "wrote reference statistics" in first.output
    bad = runner.invoke(app, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and bad.output.startswith("error:")


def test_paper_numbers_are_looked_up_for_the_presets():
    assert paper_fid("cifar10", SamplerSpec("ddim", 10, 0.0)) == 13.36
    assert paper_fid("cifar10", SamplerSpec("ddim", 100, 0.5)) == 4.46
    assert paper_fid("cifar10", SamplerSpec("ddpm", 1000, variance="beta")) == 3.17
    assert paper_fid("celeba", SamplerSpec("ddim", 50, 1.0)) == 18.48
    assert paper_fid("cifar10", SamplerSpec("ddim", 30, 0.0)) is None
    assert paper_fid("digits", SamplerSpec("ddim", 10, 0.0)) is None


def test_compare_with_fid_is_resumable(tmp_path, monkeypatch):
    from test_commands import make_run

    monkeypatch.setattr(fid, "inception_extractor", lambda weights=None, device="cpu": small_extractor)
    run = make_run(tmp_path / "run")
    np.savez(tmp_path / "ref.npz", random_images(30, 2))
    args = [
        "compare",
        str(run),
        "--steps",
        "2,5",
        "--eta",
        "0",
        "--n",
        "2",
        "--fid",
        "6",
        "--reference",
        str(tmp_path / "ref.npz"),
        "--out",
        str(tmp_path / "cmp"),
        "--no-progress",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in (tmp_path / "cmp" / "samples").iterdir())
    assert folders == ["ddim-S2-eta0", "ddim-S5-eta0", "ddpm-S50-varbeta", "dpm++2m-S2", "dpm++2m-S5"]
    first = tmp_path / "cmp" / "samples" / "ddim-S2-eta0" / "000000.png"
    assert len(list(first.parent.glob("*.png"))) == 6
    made = first.stat().st_mtime_ns
    lines = (tmp_path / "cmp" / "table.csv").read_text().splitlines()
    assert lines[0] == "sampler,steps,eta,seconds_per_image,fid" and len(lines) == 6
    assert (tmp_path / "cmp" / "fid_vs_steps.png").is_file()
    layout = (tmp_path / "cmp" / "fid_table.md").read_text().splitlines()
    assert layout[0] == "| FID | S=2 | S=5 | S=50 |" and layout[2].startswith("| eta=0 | ")
    assert layout[3].startswith("| dpm++2m | ") and layout[4].startswith("| ddpm (beta variance) |  |  | ")
    # Interrupted half way: the missing images are made again, the rest reused.
    (first.parent / "000005.png").unlink()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and first.stat().st_mtime_ns == made
    assert len(list(first.parent.glob("*.png"))) == 6
    assert json.loads((first.parent / "timing.json").read_text())["images"] == 7
    assert (tmp_path / "cmp" / "table.csv").read_text().splitlines()[1:] != [] and "fid" in again.output


def test_fid_needs_a_reference(tmp_path):
    result = CliRunner().invoke(app, ["compare", str(tmp_path), "--fid", "10"])
    assert result.exit_code == 2 and "--fid needs --reference" in result.output


def test_local_inception_weights_work_offline(tmp_path, monkeypatch):
    """--inception-weights: a random state dict of the right shape stands in for the real file."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(model.state_dict(), tmp_path / "inception.pth")
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    extract = fid.inception_extractor(tmp_path / "inception.pth")
    features = extract(torch.from_numpy(random_images(2, 0)).permute(0, 3, 1, 2).contiguous())
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    (tmp_path / "evil.pth").write_bytes(b"not a tensor file")
    with pytest.raises(fid.FIDError, match="not an Inception state dict"):
        fid.inception_extractor(tmp_path / "evil.pth")
    # torch.load reads .safetensors too; a damaged one was an internal error (SafetensorError).
    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00")
    with pytest.raises(fid.FIDError, match="not an Inception state dict.*SafetensorError"):
        fid.inception_extractor(tmp_path / "cut.safetensors")


def test_no_network_for_the_weights_is_a_clear_error(monkeypatch):
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(fid.FIDError, match="--inception-weights PATH"):
        fid.inception_extractor()


def test_fid_checks_its_inputs_before_fetching_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "inception_extractor", lambda *a, **k: pytest.fail("weights fetched before the check"))
    result = CliRunner().invoke(app, ["fid", str(tmp_path / "none"), "cifar10", "--no-progress"])
    assert result.exit_code == 1 and "is not a folder of images" in result.output
