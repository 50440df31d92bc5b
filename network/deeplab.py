"""Segmentation models trained on the pseudo-labels (the last stage of the WSSS protocol).

Two heads over one choice of backbone, all at output stride 8:

- ``deeplabv2``: DeepLab-V2's ASPP, four 3x3 convolutions straight to class scores at
  dilations 6, 12, 18 and 24 whose outputs are summed; the model most WSSS papers report.
  Its logits are at 1/8 of the input; the loss and inference upsample them.
- ``deeplabv3``: torchvision's DeepLab-V3 (``DeepLabV3`` with ``DeepLabHead``, ASPP rates
  12/24/36 and image pooling), used as the library builds it; its logits come back at the
  input size.

Backbones (:data:`BACKBONES`): ``resnet101`` is torchvision's ResNet-101 with the strides of
the last two stages replaced by dilation (2 and 4), the usual output-stride-8 DeepLab
backbone; its parameter names are torchvision's, so an ImageNet ``resnet101`` state_dict
loads into it (:func:`load_backbone_weights`). ``tiny`` is a four-stage residual network a
CPU trains in a minute, for the tests and the demo.

Batch norm of the backbone is either trained (``nn.BatchNorm2d``) or frozen
(:class:`network.frozen_bn.FrozenBatchNorm2d`, torchvision's with autocast's activations kept
in their dtype: statistics and affine parameters are constant buffers), the DeepLab-V2 recipe
when fine-tuning from ImageNet with small batches. Both
store the same tensors (frozen without ``num_batches_tracked``), so weights move freely
between the two. The models know no dataset: the class count is an argument.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torchvision.models import resnet101
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.deeplabv3 import DeepLabV3 as _TorchvisionDeepLabV3

from core.errors import UserError
from network.checkpoint import LoadReport, read_state_dict
from network.frozen_bn import FrozenBatchNorm2d

NormLayer = Callable[[int], nn.Module]
BN_MODES = ("frozen", "train")
ASPP_V2_DILATIONS = (6, 12, 18, 24)
# The ImageNet classifier of a torchvision ResNet state_dict; a segmentation backbone has none.
CLASSIFIER_KEYS = ("fc.",)
_BN_COUNTER = "num_batches_tracked"


def norm_layer(bn: str) -> NormLayer:
    """The batch-norm class of a ``bn`` mode: "frozen" (constant buffers) or "train"."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    return FrozenBatchNorm2d if bn == "frozen" else nn.BatchNorm2d


def resnet101_backbone(norm: NormLayer) -> nn.Module:
    """torchvision's ResNet-101 at output stride 8, without its pooling and classifier.

    (B, 3, H, W) -> ``{"out": (B, 2048, ceil(H / 8), ceil(W / 8))}``.
    """
    net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True], norm_layer=norm)
    return IntermediateLayerGetter(net, {"layer4": "out"})


class _Residual(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm plus a (projected) shortcut, then relu."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, norm: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class TinyBackbone(nn.Module):
    """A four-stage residual network at output stride 8 (stride 2 in the stem and the first
    two stages, dilation 2 and 4 in the last two, as in the ResNet-101 backbone).

    Args:
        widths: channels of the stem and the four stages.
        norm: batch-norm class.

    (B, 3, H, W) -> ``{"out": (B, widths[-1], ceil(H / 8), ceil(W / 8))}``.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96, 128), norm: NormLayer = nn.BatchNorm2d):
        super().__init__()
        stem, *stages = widths
        self.conv1 = nn.Conv2d(3, stem, 3, 2, padding=1, bias=False)
        self.bn1 = norm(stem)
        self.relu = nn.ReLU(inplace=True)
        layout = ((2, 1), (2, 1), (1, 2), (1, 4))  # (stride, dilation) of each stage
        cin = stem
        for i, (cout, (stride, dilation)) in enumerate(zip(stages, layout), start=1):
            setattr(self, f"layer{i}", _Residual(cin, cout, stride, dilation, norm))
            cin = cout
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return OrderedDict(out=x)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone: its builder and the channels of its ``"out"`` features."""

    build: Callable[[NormLayer], nn.Module]
    out_channels: int


BACKBONES = {
    "resnet101": BackboneSpec(resnet101_backbone, 2048),
    "tiny": BackboneSpec(lambda norm: TinyBackbone(norm=norm), 128),
}


class DeepLabV2(nn.Module):
    """A backbone and DeepLab-V2's ASPP: class scores summed over dilated 3x3 convolutions.

    Args:
        backbone: a module returning ``{"out": (B, in_channels, h, w)}``.
        in_channels: channels of the backbone's features.
        num_classes: output classes (background included).
        dilations: one 3x3 convolution per dilation.

    (B, 3, H, W) -> (B, num_classes, h, w) logits at the backbone's resolution.
    """

    def __init__(self, backbone: nn.Module, in_channels: int, num_classes: int,
                 dilations: tuple[int, ...] = ASPP_V2_DILATIONS):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.aspp = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.aspp:  # DeepLab's initialisation of the new layers
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    @property
    def head(self) -> nn.Module:
        return self.aspp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)["out"]
        return torch.stack([conv(feats) for conv in self.aspp]).sum(0)


class DeepLabV3(_TorchvisionDeepLabV3):
    """torchvision's DeepLab-V3 (no auxiliary head), returning the logits tensor itself.

    Its parameter names are torchvision's (``backbone.*``, ``classifier.*``).
    (B, 3, H, W) -> (B, num_classes, H, W) logits, upsampled to the input by torchvision.
    """

    def __init__(self, backbone: nn.Module, in_channels: int, num_classes: int):
        super().__init__(backbone, DeepLabHead(in_channels, num_classes), None)
        self.num_classes = num_classes

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)["out"]


MODELS = {"deeplabv2": DeepLabV2, "deeplabv3": DeepLabV3}
# The batch-norm mode of each model's usual recipe: DeepLab-V2 fine-tunes with frozen
# statistics; torchvision trains DeepLab-V3's batch norm.
DEFAULT_BN = {"deeplabv2": "frozen", "deeplabv3": "train"}


def build_segmentation_model(model: str, backbone: str, num_classes: int, bn: str | None = None) -> nn.Module:
    """A segmentation model of :data:`MODELS` on a backbone of :data:`BACKBONES`.

    Args:
        model: "deeplabv2" or "deeplabv3".
        backbone: "resnet101" or "tiny".
        num_classes: classes of the output (background included).
        bn: "frozen" or "train" for the backbone's batch norm (default: the model's recipe,
            :data:`DEFAULT_BN`).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    spec = BACKBONES[backbone]
    net = spec.build(norm_layer(bn or DEFAULT_BN[model]))
    return MODELS[model](net, spec.out_channels, num_classes)


def head_and_backbone_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters of the model's ``backbone`` and of its head (everything else),
    for the usual 1x / 10x learning rates."""
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ([p for p in trainable if id(p) in backbone_ids], [p for p in trainable if id(p) not in backbone_ids])


def load_backbone_weights(model: nn.Module, path: str | os.PathLike, backbone: str) -> LoadReport:
    """Load an ImageNet state_dict in torchvision's layout (e.g. ``resnet101``'s) into ``model.backbone``.

    The classifier ``fc.*`` is dropped and reported; batch-norm counters are optional.
    Anything else missing, unexpected or of another shape is refused with one message.
    """
    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state) and any(k.startswith(("classifier.", "aspp.")) for k in state):
        raise UserError(
            f"{path} holds a whole segmentation model, not ImageNet backbone weights; segmentation weights "
            "(torchvision's included) were trained with pixel labels, which weakly supervised training must "
            "not use; give an ImageNet classification state_dict", about="backbone_weights")
    report = LoadReport(dropped=sorted(k for k in state if k.startswith(CLASSIFIER_KEYS)))
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_KEYS)}
    report.compare(state, model.backbone.state_dict(), optional=(_BN_COUNTER,))
    if report.missing or report.unexpected or report.mismatched:
        raise UserError(f"{path} does not fit the {backbone} backbone ({report.differences()}); it must be an "
                        f"ImageNet {backbone} state_dict in torchvision's layout", about="backbone_weights")
    _load(model.backbone, state)
    report.loaded = len(state)
    return report


def load_segmentation_weights(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load weights written by train_seg.py (plain or resumable checkpoint) into ``model``.

    Raises:
        UserError: another class count, or another model / backbone.
    """
    state = read_state_dict(path)
    report = LoadReport()
    report.compare(state, model.state_dict(), optional=(_BN_COUNTER,))
    if report.missing or report.unexpected or report.mismatched:
        heads = [m for m in report.mismatched if not m[0].startswith("backbone.")]
        if heads and len(heads) == len(report.mismatched) and not report.missing and not report.unexpected:
            key, got, want = heads[0]
            raise UserError(f"{path} was trained for {got[0]} classes, the dataset has {want[0]} ({key}); "
                            "use the label file (and dataset) the model was trained with", about="classes")
        raise UserError(f"{path} does not fit this segmentation model ({report.differences()})",
                        about="seg_arch")
    _load(model, state)
    report.loaded = len(state)
    return report


def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (checked by :meth:`LoadReport.compare`); counters absent on either side are skipped."""
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

