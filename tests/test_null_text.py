"""Null-text inversion on a small random U-Net: it beats guided inversion, and sampling with the
fitted embeddings reproduces its reconstruction."""

import math

import pytest
import torch

from ddim_cli import UNet, UNetConfig, alpha_bars, classifier_free_guidance, invert, sample, timesteps
from ddim_cli.null_text import null_text_guidance, null_text_inversion

AB, TS = alpha_bars("cosine", 50), timesteps(50, 5, "trailing")
W = 3.0


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = UNetConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=1, resolution=8, num_classes=2
    )
    unet = UNet(config).eval().double()  # float64: Adam would magnify float32's batch-size rounding
    for parameter in unet.parameters():
        parameter.requires_grad_(False)  # the embedding alone is optimised
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 1])

    def model(x, t, embedding):
        return unet(x, t, label_embedding=embedding)

    return unet, model, x0, labels


def fit(setup, x0=None, labels=None, **kwargs):
    unet, model, default_x0, default_labels = setup
    x0 = default_x0 if x0 is None else x0
    labels = default_labels if labels is None else labels
    return null_text_inversion(
        model, x0, unet.label_emb(labels), unet.label_emb.weight[2], AB, TS, guidance=W, prediction="v", **kwargs
    )


def round_trip_error(eps_model, x0):
    return (sample(eps_model, invert(eps_model, x0, AB, TS, prediction="v"), AB, TS, prediction="v") - x0).pow(2).mean()


def test_null_text_reconstructs_as_well_as_unguided_inversion_and_sampling_reproduces_it(setup):
    unet, model, x0, labels = setup
    unguided = round_trip_error(classifier_free_guidance(unet, labels, 0.0, null_label=2), x0)
    guided = round_trip_error(classifier_free_guidance(unet, labels, W, null_label=2), x0)
    result = fit(setup, inner_steps=20, lr=0.2)
    fitted = (result.reconstruction - x0).pow(2).mean()
    assert fitted < 1.2 * unguided < guided / 3
    assert result.null_embeddings.shape == (5, 3, unet.temb_ch) and result.step_losses.shape == (5, 3)
    eps_model = null_text_guidance(model, unet.label_emb(labels), result.null_embeddings, TS, W)
    again = sample(eps_model, result.latent, AB, TS, prediction="v")
    torch.testing.assert_close(again, result.reconstruction, rtol=0, atol=1e-10)


def test_the_pivot_is_the_unguided_conditional_inversion(setup):
    unet, _, x0, labels = setup
    result = fit(setup, inner_steps=0)
    conditional = classifier_free_guidance(unet, labels, 0.0, null_label=2)
    torch.testing.assert_close(result.latent, invert(conditional, x0, AB, TS, prediction="v"), rtol=0, atol=1e-12)
    # With no optimisation every step keeps the null label's own embedding.
    assert torch.equal(result.null_embeddings, unet.label_emb.weight[2].expand(5, 3, -1))


def test_an_image_is_fitted_the_same_alone_or_in_a_batch(setup):
    _, _, x0, labels = setup
    together = fit(setup, early_stop=1e-3, inner_steps=10)
    alone = fit(setup, x0=x0[1:2], labels=labels[1:2], early_stop=1e-3, inner_steps=10)
    torch.testing.assert_close(alone.null_embeddings[:, 0], together.null_embeddings[:, 1], rtol=0, atol=1e-9)


def test_exact_pivot_reconstructs_closer(setup):
    x0 = setup[2]
    plain_pivot = (fit(setup, inner_steps=10).reconstruction - x0).pow(2).mean()
    exact_pivot = (fit(setup, inner_steps=10, exact=True, tol=1e-6, max_iter=50).reconstruction - x0).pow(2).mean()
    assert exact_pivot < plain_pivot


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance": 0.0}, "guidance w > 0"),
        ({"guidance": math.inf}, "finite guidance w > 0, got inf"),
        ({"inner_steps": -1}, "inner_steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.inf}, "lr must be a finite number > 0, got inf"),
    ],
)
def test_bad_options_raise(setup, kwargs, message):
    unet, model, x0, labels = setup
    options = {"guidance": W, **kwargs}
    with pytest.raises(ValueError, match=message):
        null_text_inversion(model, x0, unet.label_emb(labels), unet.label_emb.weight[2], AB, TS, **options)


def test_the_network_weights_get_no_gradients():
    torch.manual_seed(0)
    config = UNetConfig(
        ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), in_channels=1, resolution=4, num_classes=2
    )
    unet = UNet(config).eval().double()  # weights still require grad, as a loaded checkpoint's do
    x0 = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    null_text_inversion(
        lambda x, t, e: unet(x, t, label_embedding=e),
        x0,
        unet.label_emb(torch.tensor([1])),
        unet.label_emb.weight[2],
        AB,
        timesteps(50, 2),
        guidance=W,
        inner_steps=2,
        early_stop=0.0,
    )
    assert all(parameter.grad is None for parameter in unet.parameters())
