"""Before/after identity of the throughput work (issue 23): the outputs of the real command lines
on fixed tiny inputs, recorded once and compared by tests/test_identity.py.

What is recorded (every command through its real CLI, on the CPU, one thread):

- ``infer_bao.py`` with BAO weights: pseudo-label PNGs and the maps (``--out_cam``);
- ``infer_bao.py --method transcam``: the CAMs; ``--method cnn``: the unrefined CAMs;
- ``infer_seg.py``: label PNGs (the argmax of the averaged probabilities) and the CRF's (torch backend);
- two steps of ``train_bao.py`` (BAO from TransCAM weights) and of ``train_seg.py`` (frozen batch
  norm, the published default): every tensor of the weights they save.

The inputs are built from seeds (the generated dataset, randomly initialised tiny models). The
reference lives in tests/data/identity/: ``reference.json`` (the inputs' hashes and, per CPU kind
recorded, the machine and each output's sha256) and the first kind's outputs themselves (labels,
maps, and the weights' tensor sums), so that on a CPU kind not recorded, where float rounding
differs, the test can still compare values. Recorded with ``python -m tests.identity --write`` at
the version before the change (ebff9e1); a kind is added by running that in a checkout of ebff9e1
on a machine of the kind, then ``python -m tests.identity --add_kind THAT/reference.json`` here.
Never rewritten to make a test pass.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "identity"
ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def machine() -> dict[str, str]:
    """What decides float rounding: the CPU (its name does not tell generations apart, its family
    and model numbers do), the instruction set torch's kernels use, torch's build and the image
    libraries."""
    import PIL

    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return {"cpu": fields.get("model name") or platform.processor(), "machine": platform.machine(),
            "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint's models and optimizer state, by its path in the dict."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)

    for key in ("student", "teacher", "model", "optimizer"):
        walk(key, checkpoint.get(key))
    return found


def tensor_digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of each tensor's bytes (the .pth file's bytes also hold its temporary file's name)."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for k, v in sorted(state.items())}


def _run(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{proc.stdout}\n{proc.stderr}")


def _inputs(work: Path) -> tuple[Path, dict[str, Path]]:
    """The generated dataset and the tiny weights every command starts from."""
    from data.labels import ImageLabels
    from data.synthetic import generate
    from network.checkpoint import BAO_HEADS
    from network.conformer_CAM import Net_tiny
    from network.deeplab import build_segmentation_model

    root = work / "VOC2012"
    generate(root, num_train=6, num_val=4, size=72, seed=11)
    num_classes = ImageLabels.load(root / "cls_labels.json").num_fg + 1
    weights = {}
    torch.manual_seed(21)
    state = Net_tiny(num_classes=num_classes).state_dict()
    torch.save(state, work / "bao.pth")
    weights["bao"] = work / "bao.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith(BAO_HEADS)}, work / "transcam.pth")
    weights["transcam"] = work / "transcam.pth"
    torch.manual_seed(22)
    seg = build_segmentation_model("deeplabv2", "tiny", num_classes)
    for module in seg.modules():  # learnt-looking statistics, so that frozen batch norm is not the identity
        if hasattr(module, "running_var"):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    torch.save(seg.state_dict(), work / "seg.pth")
    torch.save(seg.backbone.state_dict(), work / "backbone.pth")
    weights["seg"], weights["backbone"] = work / "seg.pth", work / "backbone.pth"
    return root, weights


def produce(work: Path) -> dict[str, Path]:
    """Run every recorded command in ``work``; returns {output name: file} (weights as .pth)."""
    root, weights = _inputs(work)
    data = ["--voc12_root", str(root), "--label_file", str(root / "cls_labels.json"), "--device", "cpu"]
    train_list = str(root / "ImageSets" / "Segmentation" / "train.txt")
    val_list = str(root / "ImageSets" / "Segmentation" / "val.txt")
    out = work / "out"
    infer = ["infer_bao.py", *data, "--arch", "tiny", "--scales", "64,96", "--batch_size", "2", "--num_workers", "0",
             "--infer_list", train_list]
    _run(*infer, "--weights", str(weights["bao"]), "--out_pred", str(out / "bao_pred"), "--out_cam", str(out / "bao_cam"))
    _run(*infer, "--method", "transcam", "--weights", str(weights["transcam"]), "--out_cam", str(out / "transcam_cam"))
    _run(*infer, "--method", "cnn", "--weights", str(weights["transcam"]), "--out_cam", str(out / "cnn_cam"))
    _run("infer_seg.py", *data, "--backbone", "tiny", "--weights", str(weights["seg"]), "--infer_list", val_list,
         "--scales", "0.75,1.0,1.25", "--num_workers", "0", "--out_pred", str(out / "seg_pred"),
         "--out_crf", str(out / "seg_crf"), "--crf_backend", "torch", "--crf_workers", "0")
    train = ["--train_list", train_list, "--num_workers", "0", "--save_dir", str(work / "runs"), "--max_steps", "2",
             "--batch_size", "2", "--seed", "3", *data]
    _run("train_bao.py", *train, "--arch", "tiny", "--crop_size", "64", "--weights", str(weights["transcam"]),
         "--session_name", "bao")
    _run("train_seg.py", *train, "--backbone", "tiny", "--backbone_weights", str(weights["backbone"]),
         "--crop_size", "48", "--lr", "0.01",
         "--label_dir", str(root / "SegmentationClass"), "--session_name", "seg")
    files = {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}
    # --max_steps 2 ends the run at its checkpoint: the models and optimizer after two steps.
    files.update({f"train_{session}": work / "runs" / session / "checkpoint.pth" for session in ("bao", "seg")})
    return {"inputs": {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*.jpg"))}, "files": files}


def fingerprint(name: str, path: Path) -> str | dict[str, str]:
    """A file's identity: its sha256, or for weights the sha256 of each tensor."""
    if name.startswith("train_"):
        return tensor_digest(checkpoint_tensors(path))
    return sha256(path)


def write_reference(work: Path) -> None:
    """Record this CPU kind's outputs: their hashes, and the outputs themselves for the value
    comparison on other kinds (replaces tests/data/identity/)."""
    made = produce(work)
    shutil.rmtree(REFERENCE, ignore_errors=True)
    REFERENCE.mkdir(parents=True)
    kind = {"machine": machine(), "files": {}}
    for name, path in made["files"].items():
        kind["files"][name] = fingerprint(name, path)
        target = REFERENCE / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith("train_"):
            sums = {k: float(v.double().sum()) for k, v in checkpoint_tensors(path).items() if v.is_floating_point()}
            target.with_suffix(".sums.json").write_text(json.dumps(sums, indent=0, sort_keys=True) + "\n")
        else:
            shutil.copyfile(path, target)
    record = {"inputs": made["inputs"], "kinds": [kind]}
    (REFERENCE / "reference.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def add_kind(other: Path) -> None:
    """Add this CPU kind's hashes from ``other``, a reference.json that ``--write`` made on this
    machine in a checkout of the recorded version (the outputs before the change)."""
    theirs = json.loads(other.read_text())
    record = json.loads((REFERENCE / "reference.json").read_text())
    if theirs["inputs"] != record["inputs"]:
        raise SystemExit(f"{other}: made from other inputs than the reference's")
    files = theirs["kinds"][0]["files"] if "kinds" in theirs else theirs["files"]
    recorded = theirs["kinds"][0]["machine"] if "kinds" in theirs else theirs["machine"]
    here = machine()
    if any(here.get(key) != value for key, value in recorded.items()):
        raise SystemExit(f"{other} was made on another machine ({recorded}); run --add_kind where it was made")
    others = [kind for kind in record["kinds"] if kind["machine"] != here]
    record["kinds"] = [*others, {"machine": here, "files": files}]
    (REFERENCE / "reference.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="record the reference in tests/data/identity/")
    parser.add_argument("--add_kind", type=Path, default=None,
                        help="add this CPU kind's hashes from a reference.json made by --write on this machine in a "
                             "checkout of the recorded version")
    parser.add_argument("--work", default="/tmp/identity_work", help="scratch folder for the runs")
    args = parser.parse_args()
    if args.add_kind is not None:
        add_kind(args.add_kind)
        return
    if not args.write:
        parser.error("nothing to do: --write records the reference, --add_kind adds a CPU kind")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_reference(work)


if __name__ == "__main__":
    main()
