"""Where torch does the heavy arithmetic: the GPU when torch has one, else every CPU core; QDESK_DEVICE chooses."""

from __future__ import annotations

import pytest
import torch

from native.compute_device import DEVICE_VARIABLE, DeviceUnavailable, compute_device, use_all_cpu_cores


def test_without_a_choice_a_gpu_is_preferred_and_the_cpu_uses_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_VARIABLE, raising=False)
    device = compute_device()
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert device.type == expected
    if expected == "cpu":
        assert torch.get_num_threads() == use_all_cpu_cores() >= 1


def test_the_variable_and_the_argument_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_VARIABLE, "cpu")
    assert compute_device().type == "cpu"
    monkeypatch.setenv(DEVICE_VARIABLE, "no-such-device")
    assert compute_device("cpu").type == "cpu"


@pytest.mark.parametrize("name", ["no-such-device", "cuda", "mps"])
def test_a_device_torch_lacks_is_refused_in_a_sentence(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    if (name == "cuda" and torch.cuda.is_available()) or (name == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {name}")
    monkeypatch.setenv(DEVICE_VARIABLE, name)
    with pytest.raises(DeviceUnavailable, match=r"(not a device name|torch sees no)"):
        compute_device()
