"""BAO losses, pseudo-label and teacher update against values computed by hand."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from network.conformer_CAM import Net_tiny
from tool.losses import class_balanced_ce, classification_loss, smooth_targets, teacher_pseudo_label
from tool.teacher import ema_momentum, make_teacher, update_teacher
from tool.training import bao_losses


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_classification_loss_by_hand():
    # s = (conv + trans)[:, 1:]: image 0 -> [2, 0], image 1 -> [-1, 3]; background logits ignored.
    conv = torch.tensor([[5.0, 1.0, -1.0], [-7.0, -1.0, 2.0]])
    trans = torch.tensor([[0.0, 1.0, 1.0], [9.0, 0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # -log sigmoid(s) = softplus(-s) for y = 1, -log sigmoid(-s) = softplus(s) for y = 0.
    img0 = (_softplus(-2.0) + _softplus(0.0)) / 2
    img1 = (_softplus(-1.0) + _softplus(-3.0)) / 2
    got = classification_loss(conv, trans, y)
    assert got.item() == pytest.approx((img0 + img1) / 2, abs=1e-6)


def test_classification_loss_rejects_label_width():
    with pytest.raises(ValueError, match="labels"):
        classification_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4))


# Hand-made teacher CAMs: B=1, C=3 (background + 2 classes), 2x2 positions.
_CAMS = torch.tensor([[
    [[100.0, 100.0], [100.0, 100.0]],  # channel 0 is never used
    [[2.0, 1.2], [0.0, -1.0]],         # class 1: / max 2 -> [[1, .6], [0, 0 (relu)]]
    [[0.0, 3.0], [0.0, 2.7]],          # class 2: / max 3 -> [[0, 1], [0, .9]]
]])


@pytest.mark.parametrize("y,expected", [
    # both present: bg = 1 - max = [[0, 0], [1, .1]] -> argmax over [bg, c1, c2]
    ([1.0, 1.0], [[1, 2], [0, 2]]),
    # class 2 absent: bg = [[0, .4], [1, 1]]
    ([1.0, 0.0], [[1, 1], [0, 0]]),
    # class 1 absent: bg = [[1, 0], [1, .1]]
    ([0.0, 1.0], [[0, 2], [0, 2]]),
    # no foreground label: everything is background
    ([0.0, 0.0], [[0, 0], [0, 0]]),
])
def test_teacher_pseudo_label_by_hand(y, expected):
    got = teacher_pseudo_label(_CAMS, torch.tensor([y]))
    assert got.dtype == torch.int64
    assert got.tolist() == [expected]


def test_teacher_pseudo_label_is_per_image_and_scale_free():
    cams = torch.cat([_CAMS, 5.0 * _CAMS])  # scaling a channel does not change its normalised map
    y = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert teacher_pseudo_label(cams, y).tolist() == [[[1, 2], [0, 2]], [[1, 1], [0, 0]]]
    with pytest.raises(ValueError, match="labels"):
        teacher_pseudo_label(cams, torch.ones(2, 3))


def test_smooth_targets_by_hand():
    label = torch.tensor([[[0, 2]]])  # (B=1, h=1, w=2)
    got = smooth_targets(label, num_classes=3, eps=0.4)
    assert got.shape == (1, 3, 1, 2)
    assert torch.allclose(got[0, :, 0, 0], torch.tensor([0.6, 0.2, 0.2]))
    assert torch.allclose(got[0, :, 0, 1], torch.tensor([0.2, 0.2, 0.6]))
    assert torch.allclose(got.sum(1), torch.ones(1, 1, 2))
    assert torch.equal(smooth_targets(label, 3, 0.0), torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]], [[0.0, 1.0]]]]))


# Three pixels, C=2: p0 logits (0, 0), p1 (log 3, 0), p2 (0, log 4); labels bg, bg, fg.
_LOGITS = torch.tensor([[[[0.0, math.log(3.0), 0.0]], [[0.0, 0.0, math.log(4.0)]]]])
_LABEL = torch.tensor([[[0, 0, 1]]])


def test_class_balanced_ce_hard_targets_by_hand():
    # softmax: p0 (.5, .5), p1 (.75, .25), p2 (.2, .8)
    bg = (-math.log(0.5) - math.log(0.75)) / 2
    fg = -math.log(0.8)
    got = class_balanced_ce(_LOGITS, smooth_targets(_LABEL, 2, 0.0), _LABEL)
    assert got.item() == pytest.approx((bg + fg) / 2, abs=1e-6)
    # the balance matters: the plain pixel mean would be different
    assert got.item() != pytest.approx((2 * bg + fg) / 3, abs=1e-3)


def test_class_balanced_ce_smoothed_targets_by_hand():
    # eps 0.4, C=2: target 0.6 on the label, 0.4 on the other class
    p0 = -(0.6 * math.log(0.5) + 0.4 * math.log(0.5))
    p1 = -(0.6 * math.log(0.75) + 0.4 * math.log(0.25))
    p2 = -(0.4 * math.log(0.2) + 0.6 * math.log(0.8))
    got = class_balanced_ce(_LOGITS, smooth_targets(_LABEL, 2, 0.4), _LABEL)
    assert got.item() == pytest.approx(((p0 + p1) / 2 + p2) / 2, abs=1e-6)


@pytest.mark.parametrize("group", [0, 1])
def test_class_balanced_ce_one_group_only_is_finite(group):
    label = torch.full((1, 1, 3), group)
    logits = _LOGITS.clone().requires_grad_(True)
    target = smooth_targets(label, 2, 0.0)
    got = class_balanced_ce(logits, target, label)
    # The empty group is left out: the loss is the present group's mean, not half of it.
    expected = -torch.log_softmax(_LOGITS, 1)[0, group, 0].mean()
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    got.backward()
    assert torch.isfinite(logits.grad).all()


def test_ema_momentum_endpoints_and_shape():
    assert ema_momentum(0, 10, 0.9995) == pytest.approx(0.9995, abs=1e-12)
    assert ema_momentum(10, 10, 0.9995) == pytest.approx(1.0, abs=1e-12)
    assert ema_momentum(5, 10, 0.9995) == pytest.approx(1 - 0.0005 / 2, abs=1e-12)  # cosine midpoint
    values = [ema_momentum(i, 7, 0.99) for i in range(8)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        ema_momentum(11, 10, 0.9995)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_first_epoch_copies_parameters_and_buffers():
    student = _bn_net()
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student[0].weight.add_(1.0)
    student.train()(torch.randn(5, 3))  # moves the running statistics and the counter
    m = update_teacher(teacher, student, epoch=0, it=3, iters_per_epoch=10, base_momentum=0.9995)
    assert m == 0.0
    for (k, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), k


def test_later_epochs_average_parameters_only():
    student = _bn_net()
    teacher = make_teacher(student)
    before = copy.deepcopy(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(5, 3))
    m = update_teacher(teacher, student, epoch=1, it=0, iters_per_epoch=4, base_momentum=0.9)
    assert m == pytest.approx(0.9)
    for name, s in student.named_parameters():
        # teacher = 0.9 * old + 0.1 * (old + 1) = old + 0.1
        assert torch.allclose(teacher.state_dict()[name], before[name] + 0.1, atol=1e-6), name
        assert torch.allclose(s, before[name] + 1.0)
    for name, s in student.named_buffers():  # the published EMA leaves the buffers alone
        assert torch.equal(teacher.state_dict()[name], before[name]), name
        assert not torch.equal(s, before[name]), name


def test_teacher_statistics_come_from_its_own_forward_after_the_first_epoch():
    """A real BAO step in epoch 2: the teacher's batch-norm statistics are those of a train-mode
    forward of the teacher on the batch (same drop-path draws), not the student's."""
    torch.manual_seed(0)
    student = Net_tiny(num_classes=4).train()
    teacher = make_teacher(student)
    with torch.no_grad():  # the teacher differs from the student, as after an epoch of EMA
        for p in teacher.parameters():
            p.mul_(0.9)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    reference = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        reference(x)  # the teacher forward runs first in bao_losses, so it draws the same masks
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    torch.manual_seed(1)
    bao_losses(student, teacher, x, y, eps=0.4, l_pcl=1.0)["loss"].backward()
    optimizer.step()
    update_teacher(teacher, student, epoch=1, it=0, iters_per_epoch=4, base_momentum=0.9995)
    stats = [k for k, _ in teacher.named_buffers() if k.endswith(("running_mean", "running_var"))]
    assert stats
    t_buf, r_buf, s_buf = dict(teacher.named_buffers()), dict(reference.named_buffers()), dict(student.named_buffers())
    for k in stats:
        assert torch.equal(t_buf[k], r_buf[k]), k
    assert sum(not torch.allclose(t_buf[k], s_buf[k]) for k in stats) > len(stats) // 2


def test_bao_losses_runs_the_teacher_without_a_graph():
    torch.manual_seed(0)
    student = Net_tiny(num_classes=4).train()
    teacher = copy.deepcopy(student)  # parameters still require grad, as a plain copy would
    seen = []
    teacher.register_forward_hook(lambda _m, _i, out: seen.append(out.cams.requires_grad))
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    losses = bao_losses(student, teacher, x, y, eps=0.4, l_pcl=0.5)
    assert seen == [False]
    assert torch.allclose(losses["loss"], losses["loss_cls"] + 0.5 * losses["loss_pcl"])
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
