import json
import pathlib

import pytest

REF = pathlib.Path(__file__).parent / "reference"


def load_case(name):
    with open(REF / f"{name}.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def ref_dir():
    return REF
