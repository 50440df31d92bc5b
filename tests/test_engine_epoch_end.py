"""engine/loop.py's loop resumed at positions its sampler cannot reach: an error or a clean end of
the epoch, never a loop that restarts the same epoch forever (each run has a deadline); and its
refusal of a non-finite loss, which leaves the weights as the last step left them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler, default_collate

from core.errors import UserError
from tests.helpers import deadline
from core.device import Runtime
from engine.loop import Engine, Task
from engine.resume import ResumableSampler, load_checkpoint, make_loader
from engine.log import RunLog

CPU = Runtime(device=torch.device("cpu"))
DATA = [{"x": torch.full((2,), float(i)), "y": torch.tensor(float(i % 3))} for i in range(12)]  # 3 steps of 4


class _EightOfTwelve(ResumableSampler):
    """Declares the 12 samples of its dataset (len(loader) = 3 steps) but yields only the first 8 of
    each epoch: a sampler that runs out before the position's count (a dataset that shrank, a custom
    sampler whose length overstates), so that step 2 of 3 is beyond what it can reach."""

    def __iter__(self):
        return iter(list(DistributedSampler.__iter__(self))[:8][self.start:])


def _engine(run_dir, sampler_cls=ResumableSampler, max_epochs: int = 2, max_steps: int | None = None,
            fault: tuple[str, int] | None = None) -> Engine:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
        loss = ((engine.wrapped(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()
        return {"loss": loss}

    loader, sampler = make_loader(DATA, default_collate, CPU, per_rank_batch=4, num_workers=0, seed=0)
    if sampler_cls is not ResumableSampler:
        sampler = sampler_cls(DATA, 1, 0, 0)
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=4, sampler=sampler, drop_last=True,
                                             collate_fn=loader.collate_fn)
    task = Task(model=model, optimizer=optimizer, step=step, modules={"model": model})
    return Engine(task, CPU, run_dir, RunLog(run_dir, None), loader, sampler, global_batch=4,
                  max_epochs=max_epochs, max_steps=max_steps, fault=fault)


@pytest.fixture()
def checkpoint(tmp_path) -> dict:
    """A resumable checkpoint of a real run stopped at epoch 1, step 1 of 3."""
    first = _engine(tmp_path / "first", max_steps=1)
    with deadline(30, "the first run"):
        first.run()
    state = load_checkpoint(first.checkpoint_path)
    assert state["position"] == {"epoch": 0, "step": 1, "global_step": 1}
    return state


def test_resume_beyond_the_epoch_is_refused(checkpoint, tmp_path):
    """Step 5 of an epoch of 3 steps (a checkpoint of another list or batch size): one UserError."""
    checkpoint["position"] = {"epoch": 0, "step": 5, "global_step": 5}
    engine = _engine(tmp_path / "beyond")
    engine.restore(checkpoint, "test", seed=0)
    with deadline(30, "the resumed run"), pytest.raises(UserError, match=r"epoch 1, step 5 of 3.*beyond"):
        engine.run()


def test_sampler_exhausted_before_the_position_ends_the_epoch(checkpoint, tmp_path):
    """Resumed at step 2 of 3 with a sampler that has nothing left after 8 samples: the epoch ends when the
    sampler is exhausted (no step), the next epoch runs the 2 batches it has, and the run completes."""
    checkpoint["position"] = {"epoch": 0, "step": 2, "global_step": 2}
    engine = _engine(tmp_path / "short", sampler_cls=_EightOfTwelve)
    engine.restore(checkpoint, "test", seed=0)
    with deadline(30, "the resumed run"):
        engine.run()
    assert (engine.pos.epoch, engine.pos.step, engine.pos.global_step) == (2, 0, 4)
    saved = load_checkpoint(engine.checkpoint_path)
    assert saved["position"] == {"epoch": 2, "step": 0, "global_step": 4}


def test_non_finite_loss_is_refused_before_the_optimizer_step(tmp_path):
    """A NaN loss at step 2 (its backward already run) raises the message and leaves the weights
    unchanged: they equal those of a run stopped after step 1."""
    reference = _engine(tmp_path / "reference", max_steps=1)
    with deadline(30, "the reference run"):
        reference.run()
    faulty = _engine(tmp_path / "faulty", fault=("nan", 2))
    with deadline(30, "the faulty run"), pytest.raises(UserError, match=r"non-finite loss at epoch 1, step 2 \(loss=nan"):
        faulty.run()
    assert faulty.pos.global_step == 1
    for name, param in reference.task.model.named_parameters():
        assert torch.equal(param, dict(faulty.task.model.named_parameters())[name]), name
