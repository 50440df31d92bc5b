"""The throughput work changes no number (issue 23): the real command lines of tests/identity.py
(infer_bao.py for BAO labels and maps, TransCAM and CNN CAMs; infer_seg.py labels with and without
CRF; two training steps of train_bao.py and train_seg.py) give the outputs recorded before it.

On a CPU kind the reference was recorded on (tests/data/identity/reference.json names each by its
family and model numbers and torch's instruction set; the first record predates those fields and
matches no machine), with the same torch and image libraries, every file must be byte-identical
and every checkpoint tensor bit-identical. Elsewhere float rounding differs between CPU kernels
(two AMD EPYC generations give different bytes), so values are compared with the first record's
outputs: labels on almost every pixel, maps within float16 rounding, the models' weights' sums
within float32 accumulation error. The optimizer's moments are left out there: a gradient
element's sign can flip where the teacher's argmax ties, which moved one exp_avg's sum by 27% of
its absolute sum between those two generations after two steps.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.palette import read_label_png
from data.camio import load_cams
from tests.identity import REFERENCE, checkpoint_tensors, fingerprint, machine, produce

pytestmark = pytest.mark.slow  # the whole module: tests/README.md, tiers

RECORD = json.loads((REFERENCE / "reference.json").read_text())


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    return produce(tmp_path_factory.mktemp("identity"))


def _recorded_kind(made: dict) -> dict | None:
    """The record of this machine's CPU kind, when there is one and the inputs are the recorded ones."""
    here = machine()
    return next((kind for kind in RECORD["kinds"] if kind["machine"] == here and made["inputs"] == RECORD["inputs"]),
                None)


def test_every_recorded_output_is_made(made):
    for kind in RECORD["kinds"]:
        assert sorted(made["files"]) == sorted(kind["files"])
    kinds = {name.split("/")[0] for name in made["files"]}
    assert kinds == {"bao_pred", "bao_cam", "transcam_cam", "cnn_cam", "seg_pred", "seg_crf", "train_bao", "train_seg"}


def test_outputs_equal_the_recorded_ones(made):
    kind = _recorded_kind(made)
    if kind is not None:
        differing = [name for name, path in made["files"].items() if fingerprint(name, path) != kind["files"][name]]
        assert not differing, f"outputs differ from the recorded version: {differing}"
        return
    for name, path in made["files"].items():
        kind = name.split("/")[0]
        if kind.endswith("_cam"):
            (keys, maps), (ref_keys, ref_maps) = load_cams(path), load_cams(REFERENCE / name)
            np.testing.assert_array_equal(keys, ref_keys)
            np.testing.assert_allclose(maps, ref_maps, rtol=2e-3, atol=2e-3)  # float16 files: 2^-10 relative steps
        elif kind.endswith(("_pred", "_crf")):
            # Labels have no maps beside them to find the near-ties: almost every pixel must agree.
            assert (read_label_png(path) == read_label_png(REFERENCE / name)).mean() >= 0.98, name
        else:
            sums = json.loads((REFERENCE / f"{name}.sums.json").read_text())
            tensors = checkpoint_tensors(path)
            assert sorted(sums) == sorted(k for k, v in tensors.items() if v.is_floating_point())
            for key, value in ((k, v) for k, v in sums.items() if not k.startswith("optimizer/")):
                assert float(tensors[key].double().sum()) == pytest.approx(value, rel=1e-3, abs=1e-3), key
