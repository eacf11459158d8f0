from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.netns import Pair, veth_pair


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests need root (network namespaces, BPF): sudo make test")
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def pair() -> Iterator[Pair]:
    with veth_pair("t") as p:
        yield p
