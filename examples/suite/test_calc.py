import subprocess
import sys
import time

import pytest

from calc import add, mean


def test_add():
    assert add(2, 3) == 5


@pytest.mark.parametrize("values, expected", [([1.0], 1.0), ([1.0, 3.0], 2.0), ([2.0, 2.0, 5.0], 3.0)])
def test_mean(values, expected):
    assert mean(values) == expected


def test_mean_of_nothing():
    with pytest.raises(ValueError):
        mean([])


def test_spawns_a_helper_process():
    # Suites start processes of their own; retest contains them with the rest of the tree.
    out = subprocess.run([sys.executable, "-c", "print('helper ok')"], capture_output=True, text=True)
    assert out.stdout.strip() == "helper ok"


def test_takes_a_moment():
    time.sleep(0.2)
    assert True
