"""The gpu tier, in-process part: the library's CUDA branches against the CPU on the same inputs.

Run by ``make gpu-check`` (``python -m bench.gpu_suite``) on a CUDA machine; on the CPU every
test here skips with its reason. Each CUDA result is compared with the CPU's on the same weights
and inputs. CUDA runs with TF32 off (cuDNN convolutions and matmuls in full float32), so the two
devices differ by summation order only; the tolerances below are stated per comparison:

- forward (losses, logits, maps): ``|cuda - cpu| <= 1e-4 * max|cpu| + 1e-4 * |cpu|`` per tensor;
- one training step (SGD, learning rate 1, so that the update is the gradient): each parameter's
  update within ``1e-3 * max|cpu update|`` of that tensor (backward sums more terms, in another order);
- the torch dense CRF (crf/densecrf.py): marginals within 1e-3, labels equal wherever the CPU's
  two best marginals are more than 1e-3 apart (at most 1% of the pixels skipped);
- the pinned-memory loaders deliver pinned batches whose values are the CPU loaders';
- one BAO step through DistributedDataParallel on a one-process NCCL group gives the plain
  model's update within the training-step tolerance (``torchrun --nproc_per_node 1`` makes no
  process group: core.device.setup_distributed starts one for two processes and more).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate

from core.device import Runtime, memory_layout
from crf import densecrf
from crf.params import CRFParams
from data.datasets import ClassificationDataset, InferenceDataset
from data.images import read_image
from data.labels import ImageLabels, read_list
from data.layout import DatasetLayout
from data.transforms import TrainAugment
from engine.resume import make_loader, release_workers
from engine.step import train_step
from network.deeplab import build_segmentation_model
from network.factory import DEFAULT_NETWORK, build_network
from tests.helpers import assert_labels_agree_where_clear, assert_maps_close, deadline
from tool.predict import iterate_batches
from tool.teacher import make_teacher
from tool.training import bao_batch_losses, seg_batch_losses

CUDA_REASON = "no CUDA device (the gpu tier runs under make gpu-check)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)]

FORWARD_RTOL = 1e-4  # of each tensor's largest magnitude, and of each value
GRAD_TOL = 1e-3  # of each parameter's largest CPU update
CRF_TOL = 1e-3  # marginals, and the top-two margin below which a CRF label is not compared


@pytest.fixture
def full_float32():
    """CUDA in full float32 (TF32 off in cuDNN and in matmuls) for the test; the settings restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _close(cpu: torch.Tensor, cuda: torch.Tensor, rtol: float, what: str) -> None:
    """``cuda`` (any device) equals ``cpu`` within ``rtol`` of the CPU tensor's largest magnitude and of each value."""
    ref = cpu.detach().double().cpu()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    assert_maps_close(ref.numpy(), cuda.detach().double().cpu().numpy(), atol=rtol * scale, rtol=rtol, what=what)


def _no_drop_path(model: torch.nn.Module) -> torch.nn.Module:
    """Stochastic depth off: its masks come from each device's own random stream."""
    for module in model.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    return model


def _bao_batch(num_classes: int, size: int = 64, batch: int = 2) -> dict[str, torch.Tensor]:
    """A loader-like batch: ``img`` (B, 3, S, S) normalised images, ``label`` (B, C-1) multi-hot
    (at least one class each)."""
    gen = torch.Generator().manual_seed(3)
    labels = (torch.rand(batch, num_classes - 1, generator=gen) < 0.3).float()
    labels[:, 0] = 1.0
    return {"img": torch.randn(batch, 3, size, size, generator=gen), "label": labels}


def _sgd_step(model: torch.nn.Module, forward) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One :func:`engine.step.train_step` with SGD at learning rate 1: (losses, parameter name ->
    update, which is minus the gradient)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=False)
    losses = train_step(forward, optimizer, scaler)
    after = dict(model.named_parameters())
    return losses, {n: after[n].detach() - before[n] for n in before}


def _bao_run(device: torch.device, num_classes: int) -> tuple[dict[str, float], object, dict[str, torch.Tensor]]:
    """Forward of the tiny Conformer (seeded) and one BAO training step on ``device`` in its
    training layout: (losses, the student's forward output before the step, updates)."""
    torch.manual_seed(0)
    student = _no_drop_path(build_network(DEFAULT_NETWORK, "tiny", num_classes))
    student = student.to(device, memory_format=memory_layout(device, "training")).train()
    teacher = make_teacher(student)
    batch = _bao_batch(num_classes)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    with torch.no_grad():
        out = student(batch["img"].to(device, memory_format=memory_layout(device, "training")),
                      batch["label"].to(device))
    losses, updates = _sgd_step(student, lambda: bao_batch_losses(student, teacher, batch, device, 0.4, 1.0))
    return losses, out, updates


def test_bao_forward_and_training_step_on_cuda_equal_the_cpu(full_float32, num_classes):
    """The tiny Conformer's forward (logits, TransCAM and BAO maps) and one BAO step (teacher
    forward, student forward, losses, backward through engine.step.train_step's CUDA branch) on
    CUDA in channels_last, from pinned batches, against the CPU's on the same weights and batch."""
    cpu_losses, cpu_out, cpu_updates = _bao_run(torch.device("cpu"), num_classes)
    cuda_losses, cuda_out, cuda_updates = _bao_run(torch.device("cuda"), num_classes)
    for field in ("conv_logits", "trans_logits", "am", "cams", "bao"):
        _close(getattr(cpu_out, field), getattr(cuda_out, field), FORWARD_RTOL, f"forward {field}")
    assert set(cuda_losses) == set(cpu_losses) == {"loss", "loss_cls", "loss_pcl", "stop"}
    for name in ("loss", "loss_cls", "loss_pcl"):
        assert cuda_losses[name] == pytest.approx(cpu_losses[name], rel=FORWARD_RTOL), name
    assert cuda_updates.keys() == cpu_updates.keys()
    moved = 0
    for name, update in cpu_updates.items():
        _close(update, cuda_updates[name], GRAD_TOL, f"update of {name}")  # an unused parameter: 0 on both
        moved += bool(update.abs().max() > 0)
    assert moved > len(cpu_updates) // 2  # the step moved most parameters: the comparison compared gradients


def _seg_run(device: torch.device, num_classes: int) -> tuple[dict[str, float], torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and one train_seg.py step (tiny DeepLab-V2, frozen batch norm) on ``device``:
    (losses, logits before the step, updates)."""
    torch.manual_seed(0)
    model = build_segmentation_model("deeplabv2", "tiny", num_classes, "frozen")
    model = model.to(device, memory_format=memory_layout(device, "training")).train()
    gen = torch.Generator().manual_seed(4)
    batch = {"img": torch.randn(2, 3, 48, 48, generator=gen),
             "label": torch.randint(0, num_classes, (2, 48, 48), generator=gen)}
    with torch.no_grad():
        logits = model(batch["img"].to(device, memory_format=memory_layout(device, "training")))
    losses, updates = _sgd_step(model, lambda: seg_batch_losses(model, batch, device))
    return losses, logits, updates


def test_segmentation_forward_and_training_step_on_cuda_equal_the_cpu(full_float32, num_classes):
    """train_seg.py's step (DeepLab-V2 tiny, frozen batch norm): logits, loss and every parameter's gradient."""
    cpu_losses, cpu_logits, cpu_updates = _seg_run(torch.device("cpu"), num_classes)
    cuda_losses, cuda_logits, cuda_updates = _seg_run(torch.device("cuda"), num_classes)
    _close(cpu_logits, cuda_logits, FORWARD_RTOL, "segmentation logits")
    assert cuda_losses["loss"] == pytest.approx(cpu_losses["loss"], rel=FORWARD_RTOL)
    for name, update in cpu_updates.items():
        assert float(update.abs().max()) > 0, name  # frozen batch norm: every trained parameter moves
        _close(update, cuda_updates[name], GRAD_TOL, f"update of {name}")


def test_training_on_cuda_runs_channels_last(num_classes):
    """core.device.memory_layout's CUDA branch: the training model's 4-D weights and their
    gradients are channels_last on CUDA (on the CPU the layout is left as it is)."""
    device = torch.device("cuda")
    assert memory_layout(device, "training") == memory_layout(device, "seg_inference") == torch.channels_last
    torch.manual_seed(0)
    student = build_network(DEFAULT_NETWORK, "tiny", num_classes).to(device, memory_format=torch.channels_last)
    teacher = make_teacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    train_step(lambda: bao_batch_losses(student, teacher, _bao_batch(num_classes), device, 0.4, 1.0), optimizer,
               torch.amp.GradScaler("cuda", enabled=False))
    convs = [p for p in student.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def _crf_inputs(voc_root, count: int = 4) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Generated images (H, W, 3) uint8, smooth random softmax (C, H, W) and label maps (H, W) uint8."""
    names = read_list(voc_root / "ImageSets" / "Segmentation" / "train.txt")[:count]
    rng = np.random.default_rng(0)
    images, probs, labels = [], [], []
    for name in names:
        image = read_image(voc_root / "JPEGImages" / f"{name}.jpg")
        h, w = image.shape[:2]
        coarse = rng.normal(size=(6, h // 8 + 1, w // 8 + 1)).astype(np.float32) * 3
        logits = np.kron(coarse, np.ones((8, 8), np.float32))[:, :h, :w]
        p = np.exp(logits - logits.max(0))
        images.append(image)
        probs.append(p / p.sum(0))
        labels.append(p.argmax(0).astype(np.uint8))
    return images, probs, labels


@pytest.mark.parametrize("pixels_per_call", [1, None], ids=["one-image-per-call", "several-per-lattice"])
def test_torch_dense_crf_on_cuda_equals_the_cpu(voc_root, pixels_per_call):
    """crf/densecrf.py on CUDA (one image per lattice, and the GPU default: several images in one
    lattice) against the CPU (one image per lattice), both CRF uses: probabilities (infer_seg.py)
    and label maps (infer_bao.py)."""
    images, probs, labels = _crf_inputs(voc_root)
    assert densecrf.default_pixels_per_call("cuda") == densecrf.PIXELS_PER_CALL > sum(p[0].size for p in probs)
    uses = {"probabilities": (densecrf.crf_refine_probs_batch, probs, (CRFParams(),)),
            "label maps": (densecrf.crf_label_marginals_batch, labels, (6,))}
    for use, (refine, inputs, extra) in uses.items():
        cpu = refine(images, inputs, *extra, device="cpu", pixels_per_call=1)
        cuda = refine(images, inputs, *extra, device="cuda", pixels_per_call=pixels_per_call)
        assert len(cuda) == len(cpu) == len(images)
        for i, (ref, out) in enumerate(zip(cpu, cuda)):
            assert out.shape == ref.shape and out.dtype == np.float32
            assert_maps_close(ref, out, atol=CRF_TOL, what=f"{use}, image {i}")
            assert_labels_agree_where_clear(ref, out.argmax(0), margin=CRF_TOL, what=f"{use}, image {i}",
                                            max_skipped=0.01)
        # the CRF changed its input's labels somewhere: what was compared is refined output
        given = [inp if use == "label maps" else inp.argmax(0) for inp in inputs]
        assert any((out.argmax(0) != g).any() for out, g in zip(cuda, given)), use


def test_pinned_memory_loaders_deliver_the_cpu_loaders_batches(voc_root):
    """The training loader (engine.resume.make_loader) and the inference loader
    (tool.predict.iterate_batches) pin their batches for a CUDA run; the values are those of
    the same loaders for a CPU run, with a worker process and without."""
    names = read_list(voc_root / "ImageSets" / "Segmentation" / "train.txt")
    labels = ImageLabels.load(voc_root / "cls_labels.json")
    layout = DatasetLayout.voc(voc_root)
    dataset = ClassificationDataset(layout, names, labels, TrainAugment(crop_size=32, resize_long=(24, 72)), seed=5)
    loaders = {}
    try:
        for device in ("cpu", "cuda"):
            loaders[device] = make_loader(dataset, default_collate, Runtime(device=torch.device(device)),
                                          per_rank_batch=4, num_workers=1, seed=1)[0]
        assert loaders["cuda"].pin_memory and not loaders["cpu"].pin_memory
        with deadline(120, "an epoch of the training loaders"):
            pairs = list(zip(loaders["cpu"], loaders["cuda"]))
    finally:
        for loader in loaders.values():
            release_workers(loader)
    assert len(pairs) == len(names) // 4
    for cpu, cuda in pairs:
        assert cuda["img"].is_pinned() and cuda["label"].is_pinned() and not cpu["img"].is_pinned()
        assert torch.equal(cpu["img"], cuda["img"]) and torch.equal(cpu["label"], cuda["label"])

    infer = InferenceDataset(layout, names[:4], labels, scales=(32, 48), flip=True)
    with deadline(120, "the inference loaders"):
        cpu_batches = list(iterate_batches(infer, 2, 1, torch.device("cpu")))
        cuda_batches = list(iterate_batches(infer, 2, 1, torch.device("cuda")))
    assert len(cpu_batches) == len(cuda_batches) == 2
    for cpu, cuda in zip(cpu_batches, cuda_batches):
        assert [scale for scale, _ in cuda["inputs"]] == [scale for scale, _ in cpu["inputs"]] == [32, 48]
        pinned = [cuda["labels"], *(views for _, views in cuda["inputs"])]
        assert all(t.is_pinned() for t in pinned)
        assert all(torch.equal(a, b) for a, b in zip(pinned, [cpu["labels"], *(views for _, views in cpu["inputs"])]))


@contextlib.contextmanager
def _one_process_group(backend: str):
    """A process group of this process alone (rank 0 of 1), torn down after."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_process_nccl_ddp_step_equals_the_plain_step(full_float32, num_classes):
    """NCCL and DistributedDataParallel with the engine's CUDA arguments (device_ids, no buffer
    sync in forward) around the channels_last Conformer: one BAO step through the DDP wrapper
    gives the plain model's update, without DDP's gradient-stride warning (a copy per bucket)."""
    assert dist.is_nccl_available()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    plain = _no_drop_path(build_network(DEFAULT_NETWORK, "tiny", num_classes))
    plain = plain.to(device, memory_format=torch.channels_last)
    wrapped_model = copy.deepcopy(plain)
    batch = _bao_batch(num_classes)
    plain_teacher, teacher = make_teacher(plain), make_teacher(wrapped_model)
    _, expected = _sgd_step(plain, lambda: bao_batch_losses(plain, plain_teacher, batch, device, 0.4, 1.0))
    with _one_process_group("nccl"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = DistributedDataParallel(wrapped_model, device_ids=[device.index], forward_sync_buffers=False)
        assert dist.get_backend() == "nccl"
        losses, updates = _sgd_step(ddp.module, lambda: bao_batch_losses(ddp, teacher, batch, device, 0.4, 1.0))
        reduced = torch.tensor([losses["loss"]], device=device)
        dist.all_reduce(reduced)
    assert not [w for w in caught if "Grad strides do not match" in str(w.message)]
    assert float(reduced) == pytest.approx(losses["loss"])  # one rank: the sum is its own value
    for name, update in expected.items():
        _close(update, updates[name], GRAD_TOL, f"DDP update of {name}")
