"""The opt-in speed flags (issue 23): ``--compile`` compiles the model in place, ``--tf32`` sets
CUDA's matmul precision and nothing on the CPU; both are off by default in every script. And the
speed-up that changes no number on the CPU: channels_last, decided in one place."""
from __future__ import annotations

import importlib

import pytest
import torch

from core.errors import UserError
from tests.helpers import call_main
from core.device import COMPILE_MODES, LAYOUT_WORK, compile_model, configure_math, memory_layout
from data.layout import REPO_ROOT

SCRIPTS = ("train_bao", "train_seg", "infer_bao", "infer_seg", "visual_bao")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_model_script_has_the_flags_off_by_default(script):
    parser = importlib.import_module(script).get_args_parser()
    required = ["--weights", "w.pth", "--label_dir", "labels"]  # what some scripts require; others ignore it
    defaults = parser.parse_known_args(required)[0]
    assert defaults.tf32 is False and defaults.compile == "off"
    chosen = parser.parse_known_args([*required, "--tf32", "--compile", "reduce-overhead"])[0]
    assert chosen.tf32 is True and chosen.compile == "reduce-overhead"


@pytest.mark.slow
def test_compile_compiles_in_place_and_keeps_keys_and_values():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    eager = model(x)
    keys = list(model.state_dict())
    same = compile_model(model, "default")
    assert same is model  # in place: checkpoints, the teacher copy and DDP see the same module
    assert model._compiled_call_impl is not None
    torch.testing.assert_close(model(x), eager, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix in saved weights
    assert compile_model(torch.nn.Linear(2, 2), "off")._compiled_call_impl is None
    with pytest.raises(UserError, match="--compile 'fast'"):
        compile_model(model, "fast")
    assert COMPILE_MODES[0] == "off"


def test_tf32_changes_nothing_on_the_cpu():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    assert configure_math(torch.device("cpu")) == "float32 math: the CPU's (no TF32)"
    assert configure_math(torch.device("cpu"), tf32=True).endswith("so --tf32 changes nothing here")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before


def test_infer_bao_compiles_its_model_and_says_its_math(voc_root, tiny_bao_weights, tmp_path, capsys, monkeypatch):
    compiled = []
    # torch.compile itself is tested above; here only that the script hands it its model and mode
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode=None: compiled.append((type(self), mode)))
    args = ["--weights", str(tiny_bao_weights), "--arch", "tiny", "--scales", "32", "--num_workers", "0",
            "--device", "cpu", "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--infer_list", str(voc_root / "ImageSets" / "Segmentation" / "val.txt"),
            "--out_pred", str(tmp_path / "pred")]
    code, out, err = call_main("infer_bao", [*args, "--compile", "reduce-overhead", "--tf32"], capsys)
    assert code == 0, err
    assert [(t.__name__, mode) for t, mode in compiled] == [("Conformer", "reduce-overhead")]
    assert "float32 math: the CPU's (no TF32), so --tf32 changes nothing here" in out
    compiled.clear()
    code, _, err = call_main("infer_bao", [*args, "--overwrite"], capsys)
    assert code == 0 and compiled == []


def test_channels_last_is_decided_in_one_place():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert all(memory_layout(cuda, work) == torch.channels_last for work in LAYOUT_WORK)
    # On the CPU only CAM prediction, whose recorded outputs were made in it (tests/identity.py).
    assert memory_layout(cpu, "cam_prediction") == torch.channels_last
    assert memory_layout(cpu, "training") == memory_layout(cpu, "seg_inference") == torch.preserve_format
    with pytest.raises(ValueError, match="work must be one of"):
        memory_layout(cpu, "inference")
    packages = ("core", "data", "network", "crf", "tool", "scoring", "engine", "apps", "protocol", "bench", "coco14",
                "voc12")
    sources = [*REPO_ROOT.glob("*.py"), *(p for name in packages for p in (REPO_ROOT / name).rglob("*.py"))]
    deciding = [p.relative_to(REPO_ROOT).as_posix() for p in sources if "torch.channels_last" in p.read_text()]
    assert deciding == ["core/device.py"]
