"""Folding batch norms and "SAME" padding into convolutions changes nothing but the speed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codegraph3d.features.conv_folding import FoldedConv2d, fold_for_inference


def _randomised_norm(channels: int, seed: int) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    norm = nn.BatchNorm2d(channels).eval()
    norm.running_mean.copy_(torch.randn(channels, generator=generator))
    norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    norm.weight.data.copy_(torch.randn(channels, generator=generator))
    norm.bias.data.copy_(torch.randn(channels, generator=generator))
    return norm


@pytest.mark.parametrize("kernel, stride, pad", [
    (3, 2, (0, 1, 0, 1)), (5, 2, (1, 2, 1, 2)), (3, 1, (1, 1, 1, 1)), (5, 1, (2, 2, 2, 2)), (1, 2, None),
    (3, 2, (0, 1, 1, 2)),  # rows and columns padded differently: an exchange of the axes shows
    (3, 1, (1, 0, 1, 0)), (5, 2, (2, 1, 2, 1)), (3, 2, (1, 0, 0, 1)),  # more before than after
])
@pytest.mark.parametrize("size", [(16, 16), (15, 17), (7, 8)])
@pytest.mark.parametrize("groups", [1, 4])
def test_a_folded_convolution_equals_padding_convolution_and_norm(kernel, stride, pad, size, groups):
    torch.manual_seed(kernel + groups)
    conv = nn.Conv2d(4, 8, kernel, stride=stride, groups=groups, bias=groups == 1).eval()
    norm = _randomised_norm(8, seed=kernel)
    weight = conv.weight.detach().clone()
    x = torch.randn(2, 4, *size)
    expected = norm(conv(nn.ZeroPad2d(pad)(x) if pad else x))
    got = FoldedConv2d(conv, norm, pad)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv.weight, weight)  # the source convolution is read, not changed


def test_a_convolution_that_pads_itself_cannot_take_more_padding():
    with pytest.raises(ValueError, match=r"pads itself by \(1, 1\) and is given explicit padding"):
        FoldedConv2d(nn.Conv2d(2, 2, 3, padding=1), None, (0, 1, 0, 1))
    with pytest.raises(ValueError, match="is dilated"):
        FoldedConv2d(nn.Conv2d(2, 2, 3, dilation=2), None, None)
    with pytest.raises(ValueError, match="only numeric zero padding is folded"):
        FoldedConv2d(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), None, None)
    with pytest.raises(ValueError, match="only numeric zero padding is folded"):
        FoldedConv2d(nn.Conv2d(2, 2, 3, padding="same"), None, None)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self._bn = _randomised_norm(3, seed=1)
        self._act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._act(self._bn(self._conv(x)))


class _StaticSameConv(nn.Conv2d):
    """A convolution that pads like TensorFlow's "SAME" before convolving, as EfficientNet's ports do."""

    def __init__(self) -> None:
        super().__init__(1, 3, 3, stride=2, bias=False)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._stem = _StaticSameConv()
        self._stem_bn = _randomised_norm(3, seed=2)
        self._blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_bn(self._stem(x))
        for block in self._blocks:
            x = block(x)
        return x


def test_a_folded_network_computes_the_same_and_leaves_the_original_alone():
    net = _Net().eval()
    before = {name: value.clone() for name, value in net.state_dict().items()}
    folded = fold_for_inference(net, stem=[("_stem", "_stem_bn")], block_pairs=[("_conv", "_bn"), ("_missing", "_x")],
                                blocks="_blocks", inplace_activations=True)
    x = torch.randn(2, 1, 21, 20)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[name], value) for name, value in net.state_dict().items())
    assert isinstance(folded._stem_bn, nn.Identity) and isinstance(folded._blocks[0]._conv, FoldedConv2d)
    assert folded._blocks[0]._act.inplace and not net._blocks[0]._act.inplace
