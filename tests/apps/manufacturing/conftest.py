"""Small generated scenes and one fitted detector, shared by the manufacturing tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from apps.manufacturing.scenes import DEFECT_TYPES, Scene, make_scene


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread, restored afterwards: on a shared 2-core machine OpenMP's spin-waits
    made these CNN tests 4-6× slower with 2 threads; results do not depend on it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def brick_scenes() -> dict[str, list[Scene]]:
    """Brick (a real photograph): 4 fit shots, 6 held-out good, 2 per defect type (1 for fitting)."""
    fit = [make_scene("brick", None, seed=11, index=i) for i in range(4)]
    good = [make_scene("brick", None, seed=11, index=100 + i) for i in range(6)]
    defects = [make_scene("brick", d, seed=11, index=i) for d in DEFECT_TYPES for i in range(2)]
    return {"fit": fit, "good": good, "defects": defects}


@pytest.fixture(scope="session")
def fitted(brick_scenes: dict[str, list[Scene]]):  # -> FewShotDetector
    """A detector fitted on 4 normal shots + one labelled defect (with mask) per type."""
    from apps.manufacturing.model import FewShotDetector

    labelled = brick_scenes["defects"][::2]
    det = FewShotDetector(engine="torch", bank_size=2048)
    with one_thread():
        det.fit(
            [s.image for s in brick_scenes["fit"]],
            [s.image for s in labelled],
            [str(s.defect_type) for s in labelled],
            [s.mask for s in labelled],
        )
    return det


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vigil defect synth` layout for two textures, small."""
    from apps.manufacturing.scenes import write_dataset

    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root, seed=5, textures=("brick", "painted"), n_good=7, n_per_defect=2)
    return root
