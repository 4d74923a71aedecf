"""The energy meter (wan/serving/power.py): its arithmetic on a fake NVML, and its report where
NVML is missing."""
import sys
import types

import pytest
import torch

from wan.serving import power


def _fake_nvml(energy_mj, clocks, reasons):
    """A stand-in pynvml whose energy counter steps through `energy_mj`."""
    counter = iter(energy_mj)
    clock = iter(clocks)
    reason = iter(reasons)
    nvml = types.SimpleNamespace(
        NVML_CLOCK_SM=1,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
        nvmlDeviceGetTotalEnergyConsumption=lambda h: next(counter),
        nvmlDeviceGetClockInfo=lambda h, kind: next(clock, 1500),
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: next(reason, 0))
    return nvml


def test_energy_meter_joules_power_and_clocks(monkeypatch):
    # the probe at construction, then start and stop: 5_000 J between them
    nvml = _fake_nvml([0, 1_000_000, 6_000_000], clocks=[1980, 1700, 1750],
                      reasons=[0, power.SW_POWER_CAP, power.SW_POWER_CAP | 0x1])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    times = iter([10.0, 20.0])
    meter = power.EnergyMeter(0, sample_s=1e-3, clock=lambda: next(times))
    with meter:
        while len(meter._samples) < 3:  # the sampler thread's first three readings
            pass
    report = meter.report(blocks=4)
    assert report["available"]
    assert report["joules"] == pytest.approx(5000.0)
    assert report["seconds"] == pytest.approx(10.0)
    assert report["mean_power_w"] == pytest.approx(500.0)
    assert report["joules_per_block"] == pytest.approx(1250.0)
    first_three = meter._samples[:3]
    assert first_three == [(1980, False), (1700, True), (1750, True)]


def test_energy_meter_without_nvml_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ModuleNotFoundError
    meter = power.EnergyMeter(0)
    with meter:
        pass
    report = meter.report(blocks=3)
    assert report["available"] is False
    assert "NVML" in report["why"] and "pynvml" in report["why"]


def test_energy_meter_report_before_stop_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([0, 1, 2], [], []))
    meter = power.EnergyMeter(0).start()
    try:
        with pytest.raises(RuntimeError, match="before the measured stretch ended"):
            meter.report()
    finally:
        meter.stop()


def test_energy_meter_on_a_cpu_device_measures_nothing_even_with_nvml(monkeypatch):
    """Work on a CPU is not the GPU's: the meter says so rather than reading GPU 0's counter."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([0, 1, 2], [], []))
    with power.EnergyMeter(torch.device("cpu")) as meter:
        pass
    report = meter.report(blocks=2)
    assert report == {"available": False,
                      "why": "not a CUDA device (cpu): no GPU energy to measure"}
