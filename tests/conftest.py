import os
import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh, but reproducible, random inputs per test
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KQUANT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set KQUANT_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
