"""Shared test setup: fresh models from the zoo, and single-threaded torch.

The test models are tiny, so intra-op threads only add overhead (10× slower on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

from tests.zoo import ZOO, Case

torch.set_num_threads(1)


@pytest.fixture(params=list(ZOO))
def zoo_case(request: pytest.FixtureRequest) -> Case:
    """A freshly built model of the zoo with its data, one per zoo entry."""
    return ZOO[request.param]()
