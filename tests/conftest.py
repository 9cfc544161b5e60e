"""Shared fixtures: a tiny synthetic paired CT/MR dataset, made once per test session.

`tiny_dataset`: a dataset-layout folder (dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/)
of 6 phantom cases of 32^3 voxels (4.5 mm), seed 0, source domain: 4 training, 1 validation,
1 test case. `tiny_case`: the first training case read back, as
{"id": str, "images": [CT (32, 32, 32) float32 HU, MR float32], "label": uint8 0-7, "geometry": Geometry}.
Read-only: tests that modify files copy them first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossmodalnet.data.dataset import load_case, load_dataset, read_spec
from crossmodalnet.data.phantom import synthesize

TINY_CASES = 6
TINY_SIZE = 32


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a 6-case, 32^3 phantom dataset (about a second to make)."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    return synthesize(root, cases=TINY_CASES, size=TINY_SIZE, seed=0, domain="source", workers=1)


@pytest.fixture(scope="session")
def tiny_case(tiny_dataset: Path) -> dict:
    """The first training case of `tiny_dataset` as arrays plus its geometry."""
    case = load_dataset(tiny_dataset)["training"][0]
    return {"id": case.id, **load_case(case, read_spec(tiny_dataset))}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): for tiny
    models on shared cores, spinning OpenMP threads cost far more than they gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

