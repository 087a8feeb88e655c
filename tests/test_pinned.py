"""Refactors change no number: tiny W3A8 fixture searches equal their pins bit for bit."""
import numpy as np
import pytest

from pinned_search import PIN_FILE, RUNS, pinned_run


@pytest.mark.parametrize("name", sorted(RUNS))
def test_search_reproduces_its_pinned_numbers(name):
  with np.load(PIN_FILE) as pins:
    want = {k.split(":", 1)[1]: pins[k] for k in pins.files if k.startswith(name + ":")}
  got = pinned_run(name)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key} moved")
