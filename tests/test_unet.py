import math

import pytest
import torch

from ddim_cli.unet import UNet, UNetConfig, timestep_embedding

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, in_channels=3, resolution=8)


def tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**TINY, **overrides}))


def test_timestep_embedding_golden_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 4)
    # half = 2 frequencies: exp(0) = 1 and exp(-log(10000) / (2 - 1)) = 1e-4.
    expected = torch.tensor([[0, 0, 1, 1], [math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4)]])
    torch.testing.assert_close(emb, expected, rtol=1e-6, atol=1e-7)
    assert timestep_embedding(torch.tensor([3]), 5).shape == (1, 5)  # odd widths are zero-padded


def test_cifar10_config_has_the_ddpm_parameter_count_and_key_layout():
    model = UNet(UNetConfig())  # the DDPM / DDIM CIFAR-10 model
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    keys = set(model.state_dict())
    for key in [
        "temb.dense.0.weight",
        "temb.dense.1.bias",
        "conv_in.weight",
        "down.0.block.0.norm1.weight",
        "down.0.downsample.conv.weight",
        "down.1.block.0.nin_shortcut.weight",
        "down.1.attn.1.q.weight",
        "mid.block_1.temb_proj.weight",
        "mid.attn_1.proj_out.weight",
        "up.3.block.2.conv2.weight",
        "up.1.upsample.conv.weight",
        "norm_out.weight",
        "conv_out.bias",
    ]:
        assert key in keys, key
    assert "down.3.downsample.conv.weight" not in keys and "up.0.upsample.conv.weight" not in keys
    assert model.state_dict()["down.1.attn.0.q.weight"].shape == (256, 256, 1, 1)


def test_output_shape_and_eval_determinism():
    model = tiny().eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999])
    with torch.no_grad():
        first, second = model(x, t), model(x, t)
    assert first.shape == x.shape
    assert torch.equal(first, second)


def test_dropout_is_active_only_in_training():
    model = tiny(dropout=0.5).train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    assert not torch.equal(model(x, t), model(x, t))


def test_timestep_changes_the_output():
    model = tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([10])), model(x, torch.tensor([900])))


def test_each_image_is_independent_of_its_batch():
    model = tiny().eval()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([5, 50, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t)[2:], model(x[2:], t[2:]), rtol=1e-5, atol=1e-6)


def test_class_conditioning_changes_the_output_and_none_means_the_null_label():
    model = tiny(num_classes=3).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 100])
    with torch.no_grad():
        # Embeddings start random, so every label gives a different prediction.
        outputs = [model(x, t, torch.tensor([label, label])) for label in range(4)]
        assert all(not torch.allclose(outputs[i], outputs[j]) for i in range(4) for j in range(i))
        torch.testing.assert_close(model(x, t), outputs[3], rtol=0, atol=0)
    assert model.label_emb.weight.shape == (4, 128)


def test_labels_on_an_unconditional_model_raise():
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.tensor([0]))


def test_float64_channels_last_and_bf16_autocast_paths():
    model = tiny().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        reference = model(x, t)
        channels_last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, t)
        model64 = tiny().eval().double()
        assert model64(x.double(), t).dtype == torch.float64
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-5)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - reference).abs().max() < 0.1


def test_no_attention_and_avgpool_variant():
    model = tiny(attn_resolutions=(), resamp_with_conv=False, in_channels=1, out_ch=2).eval()
    assert not any("attn." in key for key in model.state_dict() if not key.startswith("mid."))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8), torch.tensor([0, 1])).shape == (2, 2, 8, 8)


def test_patching_is_the_half_resolution_unet_between_pixel_unshuffle_and_shuffle():
    # patch_size 2 must be exactly: fold each 2x2 block into 4 channels, run the U-Net at half the
    # resolution, unfold. The same weights in an unpatched U-Net of 4 channels at 8x8 say so.
    patched = tiny(patch_size=2, resolution=16, in_channels=1, num_classes=3).eval()
    plain = UNet(UNetConfig(**{**TINY, "resolution": 8, "in_channels": 4, "num_classes": 3})).eval()
    plain.load_state_dict(patched.state_dict())
    assert patched.conv_in.weight.shape[1] == 4 and patched.conv_out.weight.shape[0] == 4
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 3])
    with torch.no_grad():
        out = patched(x, t, y)
        block = torch.zeros(1, 1, 16, 16)
        block[0, 0, 0, 1] = 1  # pixel (0, 1) of the first 2x2 block is channel 1 at (0, 0)
        folded = plain(x.view(2, 1, 8, 2, 8, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 4, 8, 8), t, y)
    assert torch.nn.functional.pixel_unshuffle(block, 2)[0, :, 0, 0].tolist() == [0, 1, 0, 0]
    unfolded = folded.view(2, 1, 2, 2, 8, 8).permute(0, 1, 4, 2, 5, 3).reshape(2, 1, 16, 16)
    torch.testing.assert_close(out, unfolded, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(ch=48), "multiple of 32"),
        (dict(resolution=9), "divisible by 2"),
        (dict(attn_resolutions=(16,)), "match no feature-map size"),
        (dict(ch_mult=()), "non-empty"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
        (dict(resolution=0), "resolution"),
        (dict(patch_size=0), "patch_size"),
        (dict(patch_size=2, resolution=10), "divisible by 4 \\(patch_size 2"),
        (dict(patch_size=2, attn_resolutions=(8,), resolution=8), "this model has \\[4, 2\\]"),
    ],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet(UNetConfig(**{**TINY, **overrides}))
