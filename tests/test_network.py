"""Conformer layout, shapes, gradients and checkpoint loading; the frozen batch norm of the segmentation models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from core.errors import UserError
from network.checkpoint import BAO_HEADS, CLASSIFIER_HEADS, checkpoint_kind, load_weights, read_state_dict
from network.conformer import REFINE_MODES, Conformer, build_conformer
from network.conformer_CAM import ARCHS, Net_sm, Net_ti, Net_tiny
from network.factory import build_network
from tests.helpers import assert_refused, run_script

DATA = Path(__file__).parent / "data"


def _layout(size: str) -> list[tuple[str, str]]:
    rows = (line.rstrip("\n").split("\t") for line in (DATA / f"net_{size}_state_dict.tsv").open())
    return [(name, shape) for name, shape in rows]


@pytest.mark.parametrize("refine", ["attention", "none"])
@pytest.mark.parametrize("builder,size", [(Net_sm, "sm"), (Net_ti, "ti")])
def test_state_dict_layout_equals_published(builder, size, refine):
    """The refinement option adds no parameter or buffer: both settings load the published checkpoints."""
    with torch.device("meta"):
        model = builder(num_classes=21, refine=refine)
    got = [(k, ",".join(map(str, v.shape))) for k, v in model.state_dict().items()]
    assert got == _layout(size)


def test_parameter_counts_match_spec():
    with torch.device("meta"):
        assert sum(p.numel() for p in Net_sm().parameters()) == 36_680_127
        assert sum(p.numel() for p in Net_ti().parameters()) == 22_992_975


def test_class_count_sets_heads():
    with torch.device("meta"):
        model = Net_sm(num_classes=81)
    assert model.label_enc.weight.shape == (1024, 80)
    assert model.classifier_x.weight.shape[0] == 81
    assert model.trans_cls_head.weight.shape[0] == 81


@pytest.fixture(scope="module")
def tiny() -> Conformer:
    torch.manual_seed(0)
    return Net_tiny(num_classes=6)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_forward_shapes(tiny, hw):
    b, k = 2, tiny.num_classes
    x = torch.randn(b, 3, *hw)
    labels = torch.zeros(b, k - 1)
    labels[0, 1] = labels[1, 3] = 1
    out = tiny.eval()(x, labels)
    h, w = hw[0] // 16, hw[1] // 16
    assert out.conv_logits.shape == out.trans_logits.shape == (b, k)
    for t in (out.am, out.cams, out.bao):
        assert t.shape == (b, k, h, w)
    assert torch.equal(out.bao[:, :1], out.am[:, :1])
    assert torch.equal(out.bao[:, 1:], out.cams[:, 1:])
    conv_logits, trans_logits, am, cams, bao = out  # the published tuple order
    assert am is out.am and cams is out.cams


def test_forward_without_labels_skips_bao(tiny):
    out = tiny.eval()(torch.randn(1, 3, 32, 32))
    assert out.am is None and out.bao is None and out.cams.shape == (1, 6, 2, 2)


def test_rejects_bad_inputs(tiny):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="labels must be"):
        tiny(torch.randn(1, 3, 32, 32), torch.zeros(1, 3))


def test_refine_matches_definition():
    maps = torch.randn(2, 3, 2, 3)
    attn = torch.rand(2, 6, 6)
    out = Conformer.refine(maps, attn)
    flat = maps.flatten(2)
    expected = torch.einsum("bij,bkj->bki", attn, flat).reshape(2, 3, 2, 3)
    assert torch.allclose(out, expected, atol=1e-6)


def _heads_and_attention(model: Conformer, x: torch.Tensor, labels: torch.Tensor):
    """Forward ``model`` once; return its output, the outputs of its two map heads (conv_cls_head,
    classifier_x) read with hooks, and the summed attention forward_features gave in the same pass."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, head).register_forward_hook(lambda _m, _i, out, head=head: seen.__setitem__(head, out))
             for head in ("conv_cls_head", "classifier_x")]
    features = model.forward_features

    def spy(inp: torch.Tensor):
        out = features(inp)
        seen["attn"] = out[2]
        return out

    model.forward_features = spy  # an instance attribute, removed below
    try:
        out = model(x, labels)
    finally:
        del model.forward_features
        for h in hooks:
            h.remove()
    return out, seen["conv_cls_head"], seen["classifier_x"], seen["attn"]


def test_refine_none_gives_the_unrefined_heads_and_attention_the_refined_ones():
    """Hand check on a toy input: with refine="none" the TransCAM CAMs are conv_cls_head's map and the
    BAO activation map is classifier_x's, as they come out of the heads; the default forward refines
    both with the summed attention, refine(M)[i] = sum_j A[i, j] M[:, j]. Same weights, same logits."""
    torch.manual_seed(0)
    refined = Net_tiny(num_classes=4).eval()
    plain = Net_tiny(num_classes=4, refine="none").eval()
    plain.load_state_dict(refined.state_dict(), strict=True)
    assert refined.refine_mode == "attention" and plain.refine_mode == "none"
    x = torch.randn(2, 3, 48, 64)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    with torch.no_grad():
        out, class_map, bao_map, attn = _heads_and_attention(plain, x, labels)
        assert torch.equal(out.cams, class_map) and torch.equal(out.am, bao_map)
        assert torch.equal(out.bao, torch.cat([bao_map[:, :1], class_map[:, 1:]], dim=1))
        assert torch.equal(out.cams, plain.forward_cnn_cams(x))

        ref, ref_class_map, ref_bao_map, ref_attn = _heads_and_attention(refined, x, labels)
    assert torch.equal(ref_class_map, class_map) and torch.equal(ref_bao_map, bao_map) and torch.equal(ref_attn, attn)
    b, k, h, w = class_map.shape
    by_hand = [torch.einsum("bij,bkj->bki", attn, m.flatten(2)).reshape(b, k, h, w) for m in (class_map, bao_map)]
    assert torch.allclose(ref.cams, by_hand[0], atol=1e-5) and torch.allclose(ref.am, by_hand[1], atol=1e-5)
    assert not torch.allclose(ref.cams, out.cams, atol=1e-3)  # the refinement does change the maps
    assert torch.equal(ref.conv_logits, out.conv_logits) and torch.equal(ref.trans_logits, out.trans_logits)


def test_unknown_refine_mode_is_refused():
    with pytest.raises(ValueError, match="refine must be one of"):
        Net_tiny(num_classes=3, refine="mean")


@pytest.mark.parametrize("script", ["train_bao", "infer_bao", "visual_bao"])
def test_refine_flag_is_the_same_in_every_script_and_defaults_to_attention(script, tmp_path):
    """Training defaults to attention; inference and overlays leave the flag unset (None) so that the
    training run's args.json beside --weights decides, and without one it resolves to attention."""
    import importlib

    from apps.run_settings import prediction_settings_from_run

    parser = importlib.import_module(script).get_args_parser()
    (action,) = [a for a in parser._actions if "--refine" in a.option_strings]
    assert tuple(action.choices) == REFINE_MODES == ("attention", "none")
    if script == "train_bao":
        assert action.default == "attention"
        return
    assert action.default is None
    weights = tmp_path / "w.pth"  # no args.json beside it
    args = parser.parse_args(["--weights", str(weights)])
    assert prediction_settings_from_run(args) is None and args.refine == "attention"


def test_attention_sum_is_sum_of_head_means(tiny):
    """forward_features' running sum equals summing every block's head-averaged attention."""
    tiny.eval()
    x = torch.randn(1, 3, 32, 48)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out[1]))
             for m in tiny.modules() if type(m).__name__ == "Attention"]
    try:
        _, _, attn_sum = tiny.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == tiny.depth
    expected = sum(a[:, :, 1:, 1:].mean(1) for a in seen)
    assert torch.allclose(attn_sum, expected, atol=1e-5)
    # each block's rows sum to 1 over all 1+N tokens, so patch rows sum to at most depth
    assert attn_sum.sum(-1).max() <= tiny.depth + 1e-4


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = Net_tiny(num_classes=4, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 48)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    out = model(x, labels)
    loss = out.conv_logits.sum() + out.trans_logits.sum() + out.am.pow(2).mean() + out.cams.mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("batch", [1, 3])
def test_gradients_have_the_layout_of_their_parameters(batch):
    """Every gradient has its parameter's strides, as DistributedDataParallel's buckets expect (else it
    warns "Grad strides do not match bucket view strides" and copies the gradient every step).
    At batch 1 the class token's gradient was a view into the (1, 1+N, E) gradient of the token
    sequence; its value is the sum over the batch of the class-token rows of that gradient."""
    torch.manual_seed(0)
    model = Net_tiny(num_classes=4, drop_path_rate=0.0).train()
    tokens = []
    model.trans_1.register_forward_pre_hook(lambda _module, args: tokens.append(args[0]))
    out = model(torch.randn(batch, 3, 64, 48), torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]])[:batch])
    tokens[0].retain_grad()
    (out.conv_logits.sum() + out.trans_logits.pow(2).sum() + out.am.pow(2).mean()).backward()
    mismatched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert mismatched == []
    assert torch.equal(model.cls_token.grad, tokens[0].grad[:, :1].sum(0, keepdim=True))


def test_build_network_by_name():
    assert set(ARCHS) == {"tiny", "ti", "sm", "bs"}
    model = build_network("network.conformer_CAM", "tiny", num_classes=3)
    assert model.num_classes == 3
    with pytest.raises(UserError, match="unknown --arch"):
        build_network("network.conformer_CAM", "huge", num_classes=3)
    with pytest.raises(UserError, match="cannot import"):
        build_network("network.nope", "sm", num_classes=3)
    with pytest.raises(ValueError, match="unknown Conformer size"):
        build_conformer("huge")


# -- checkpoints -------------------------------------------------------------------------

def test_sm_state_dict_round_trips_strictly(tmp_path):
    torch.manual_seed(0)
    src = Net_sm(num_classes=21)
    path = tmp_path / "bao.pth"
    torch.save(src.state_dict(), path)
    dst = Net_sm(num_classes=21)
    dst.load_state_dict(torch.load(path, weights_only=True), strict=True)
    report = load_weights(Net_sm(num_classes=21), path, purpose="bao")
    assert report.loaded == len(src.state_dict()) and not report.missing and not report.unexpected
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.fixture
def tiny_state():
    torch.manual_seed(1)
    return Net_tiny(num_classes=6).state_dict()


def test_transcam_checkpoint_loads_for_training_and_is_refused_for_bao(tmp_path, tiny_state):
    transcam = {k: v for k, v in tiny_state.items() if not k.startswith(BAO_HEADS)}
    path = tmp_path / "transcam.pth"
    torch.save(transcam, path)
    assert checkpoint_kind(transcam) == "transcam"
    model = Net_tiny(num_classes=6)
    init_label_enc = model.label_enc.weight.clone()
    report = load_weights(model, path, purpose="transcam")
    assert sorted(report.missing) == sorted(k for k in tiny_state if k.startswith(BAO_HEADS))
    assert "4 missing" in report.summary() and "label_enc.weight" in report.summary()
    assert torch.equal(model.label_enc.weight, init_label_enc)  # kept its initialisation
    assert torch.equal(model.conv_cls_head.weight, tiny_state["conv_cls_head.weight"])
    with pytest.raises(UserError, match="TransCAM checkpoint.*TransCAM baseline"):
        load_weights(Net_tiny(num_classes=6), path, purpose="bao")


def test_module_prefixed_and_wrapped_checkpoints(tmp_path, tiny_state):
    prefixed = {f"module.{k}": v for k, v in tiny_state.items()}
    for i, obj in enumerate([prefixed, {"model": prefixed}, {"state_dict": tiny_state, "epoch": 3}]):
        path = tmp_path / f"c{i}.pth"
        torch.save(obj, path)
        assert list(read_state_dict(path)) == list(tiny_state)
        model = Net_tiny(num_classes=6)
        report = load_weights(model, path, purpose="bao")
        assert report.loaded == len(tiny_state) and not report.missing
        assert torch.equal(model.classifier_x.weight, tiny_state["classifier_x.weight"])


def test_imagenet_weights_drop_heads(tmp_path, tiny_state):
    imagenet = {k: v for k, v in tiny_state.items() if not k.startswith(BAO_HEADS + CLASSIFIER_HEADS)}
    imagenet["trans_cls_head.weight"] = torch.zeros(1000, 96)
    imagenet["trans_cls_head.bias"] = torch.zeros(1000)
    imagenet["conv_cls_head.weight"] = torch.zeros(1000, 256)
    imagenet["conv_cls_head.bias"] = torch.zeros(1000)
    path = tmp_path / "imagenet.pth"
    torch.save(imagenet, path)
    assert checkpoint_kind(imagenet) == "imagenet"
    report = load_weights(Net_tiny(num_classes=6), path, purpose="backbone")
    assert len(report.dropped) == 4 and "dropped 4" in report.summary()
    assert set(report.missing) == {k for k in tiny_state if k.startswith(BAO_HEADS + CLASSIFIER_HEADS)}
    with pytest.raises(UserError, match="ImageNet classification weights"):
        load_weights(Net_tiny(num_classes=6), path, purpose="transcam")


def test_wrong_class_count_and_architecture_are_refused(tmp_path, tiny_state):
    path = tmp_path / "t.pth"
    torch.save(tiny_state, path)
    with pytest.raises(UserError, match="different number of classes"):
        load_weights(Net_tiny(num_classes=21), path, purpose="bao")
    with pytest.raises(UserError, match="does not fit this model.*model size"):
        load_weights(Net_tiny(num_classes=6, embed_dim=48), path, purpose="bao")


def test_unsafe_truncated_and_missing_files(tmp_path, tiny_state):
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "none.pth")
    good = tmp_path / "good.pth"
    torch.save(tiny_state, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_state_dict(cut)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        read_state_dict(text)
    evil = tmp_path / "evil.pth"
    torch.save({"model": tiny_state, "hook": _Payload()}, evil)
    with pytest.raises(UserError, match="weights_only"):
        read_state_dict(evil)


class _Payload:
    """An arbitrary object: unpickling it needs code, which weights_only refuses."""


@pytest.mark.parametrize("patch_size", [8, 32])
def test_patch_size_other_than_the_cnn_stride_is_refused(patch_size):
    from network.conformer import Conformer

    with pytest.raises(ValueError, match="patch_size must be 16"):
        Conformer(num_classes=3, patch_size=patch_size, depth=3, embed_dim=32, num_heads=2, channel_ratio=1)


@pytest.mark.parametrize("content", [b"these are not weights\n", b"hello", b"", b"\x80\x02}q\x00.", bytes(range(256))])
def test_any_file_that_is_not_a_checkpoint_is_one_user_error(tmp_path, content, recwarn):
    """Text, a few bytes, an empty file, a bare pickle, random bytes: the unpickler fails with
    IndexError, KeyError, ... inside torch; each must become the one user error, with no warning."""
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"notes.pth is not a (readable PyTorch checkpoint|.*state_dict)"):
        read_state_dict(path)
    assert not [w for w in recwarn if "pickle" in str(w.message).lower()]


def test_text_weights_through_the_cli_are_one_line(tmp_path, voc_root):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    proc = run_script("infer_bao.py", "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
                   "--infer_list", str(voc_root / "ImageSets/Segmentation/train.txt"), "--weights", str(path),
                   "--arch", "tiny", "--device", "cpu", "--out_pred", str(tmp_path / "out"))
    assert_refused(proc.returncode, proc.stderr, "notes.pth is not a readable PyTorch checkpoint")
    assert proc.stderr.count("\n") == 1  # nothing before the error line (no torch warning)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ frozen batch norm
def _frozen_pair(channels: int, seed: int, eps: float = 1e-5):
    """Ours and torchvision's FrozenBatchNorm2d with the same random (learnt-looking) buffers."""
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

    from network.frozen_bn import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed)
    ours, theirs = FrozenBatchNorm2d(channels, eps), TorchvisionFrozenBatchNorm2d(channels, eps)
    state = {"weight": torch.rand(channels, generator=gen) + 0.5, "bias": torch.randn(channels, generator=gen),
             "running_mean": torch.randn(channels, generator=gen),
             "running_var": torch.rand(channels, generator=gen) * 3 + 1e-3}
    theirs.load_state_dict(state)
    ours.load_state_dict({**state, "num_batches_tracked": torch.tensor(7)})  # a trained norm's dict loads
    return ours, theirs


@pytest.mark.parametrize("shape, eps", [((2, 5, 7, 9), 1e-5), ((1, 64, 33, 17), 1e-3), ((3, 3, 1, 1), 0.0)])
def test_frozen_batch_norm_is_torchvisions_bit_for_bit_in_float32(shape, eps):
    ours, theirs = _frozen_pair(shape[1], seed=shape[1], eps=eps)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    x = (torch.randn(*shape) * 4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, ref = ours(x), theirs(x_ref)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    grad = torch.randn(*shape)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    double = torch.randn(*shape, dtype=torch.float64)
    assert torch.equal(ours(double), theirs(double))


def test_frozen_batch_norm_keeps_autocast_bf16_activations_in_bf16():
    ours, theirs = _frozen_pair(8, seed=1)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 12, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x)
        out, promoted = ours(low), theirs(low)
    assert low.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    assert promoted.dtype == torch.float32  # torchvision's promotes: what ours avoids
    torch.testing.assert_close(out.float(), promoted, rtol=2e-2, atol=2e-2)


def test_segmentation_models_use_the_dtype_keeping_frozen_batch_norm():
    from network.deeplab import build_segmentation_model
    from network.frozen_bn import FrozenBatchNorm2d

    model = build_segmentation_model("deeplabv2", "tiny", 4, "frozen")
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
