"""OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = "import os, cellmint, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_wait_policy_is_set_before_torch_loads_and_a_user_choice_wins(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_torch_loaded_first_is_left_alone():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    probe = "import os, torch, cellmint; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"  # too late to take effect: not pretended
