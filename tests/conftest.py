"""pytest fixtures shared by every folder, and the folder markers.

Plain helpers (the repository root, the app runner, small configurations) are in ``fixtures.py``.
Each test carries the marker of its folder, so ``pytest -m unit`` (or ``integration``,
``container``, ``research``) runs one kind: unit tests mirror the package's layers; integration
tests run the real app, the bank, the PACS round trip and the documents' commands; container tests
check the MAP's entrypoint, manifests and, with the image built, the image; research tests cover
the research tooling.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from codegraph3d_research.synthetic import make_cohort

_FOLDER_MARKERS = ("unit", "integration", "container", "research")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        folder = Path(item.fspath).relative_to(tests).parts[0]
        if folder in _FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six subjects (two with lesions), T2w + T1w each, localizers in some, coarse matrices."""
    folder = tmp_path_factory.mktemp("tiny_cohort")
    make_cohort(folder, n_subjects=6, lesion_fraction=1 / 3, matrix_scale=0.3, seed=1, with_localizer_fraction=0.5)
    return folder
