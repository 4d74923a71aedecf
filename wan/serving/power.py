"""The GPU's energy and clocks over a stretch of work, read through NVML (`nvidia-ml-py`, the
`pynvml` module), where it is installed.

Why: at four players an H200 spends much of its time at its 700 W power cap, where its clocks
drop (lab notebook step 36), so how many players hold real time depends on the energy a block
takes as well as on its time at full clock. `EnergyMeter` reads the driver's energy counter
(millijoules since the driver loaded) at the start and end of a stretch, and samples the SM clock
and the throttle reasons on a background thread.

Without NVML (a CPU machine, a GPU without the counter) the meter says so in its report and
measures nothing: `report()` gives `{"available": False, "why": ...}`.
"""
import logging
import statistics
import threading
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)

# nvmlClocksEventReasonSwPowerCap (the older name: nvmlClocksThrottleReasonSwPowerCap)
SW_POWER_CAP = 0x4


class EnergyMeter:
    """`with EnergyMeter(device) as meter: ...` (or `start()` ... `stop()`), then
    `meter.report(blocks=n)`: joules over the stretch, per block when `blocks` is given, mean
    power, median SM clock and the share of samples at the software power cap. `device`: the
    torch device the work runs on (a non-CUDA one measures nothing and says so) or a GPU index.
    The index is NVML's: the CUDA index where CUDA_VISIBLE_DEVICES does not renumber the GPUs."""

    def __init__(self, device=0, sample_s: float = 0.1, clock=time.perf_counter):
        self.sample_s, self._clock = sample_s, clock
        self.why_not: Optional[str] = None
        self._nvml = self._handle = None
        self._samples = []  # (SM MHz, power-capped)
        self._stop = threading.Event()
        self._thread = None
        self._start_mj = self._end_mj = None
        self._start_s = self._end_s = None
        index = _gpu_index(device)
        if index is None:
            self.why_not = f"not a CUDA device ({device}): no GPU energy to measure"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # raises where unsupported
            # renamed in newer NVML ("events"); either name reads the same bit mask
            self._reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
                or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
            self._nvml = pynvml
        except Exception as error:  # no module, no driver, no counter: report why, measure nothing
            self.why_not = f"NVML energy counter unavailable: {type(error).__name__}: {error}"

    def _energy_mj(self) -> int:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def _sample(self):
        nvml = self._nvml
        while not self._stop.wait(self.sample_s):
            try:
                mhz = nvml.nvmlDeviceGetClockInfo(self._handle, nvml.NVML_CLOCK_SM)
                reasons = self._reasons(self._handle)
            except Exception as error:  # a sample lost is not worth stopping the work for
                log.debug("clock sample failed: %s", error)
                continue
            self._samples.append((mhz, bool(reasons & SW_POWER_CAP)))

    def start(self):
        """Begin the measured stretch (what `with` does on entry)."""
        if self._nvml is not None:
            self._start_mj, self._start_s = self._energy_mj(), self._clock()
            self._thread = threading.Thread(target=self._sample, name="energy-meter",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self):
        """End the measured stretch (what `with` does on exit)."""
        if self._nvml is not None and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._end_mj, self._end_s = self._energy_mj(), self._clock()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def report(self, blocks: Optional[int] = None) -> dict:
        if self._nvml is None:
            return {"available": False, "why": self.why_not}
        if self._end_mj is None:
            raise RuntimeError("EnergyMeter.report() before the measured stretch ended "
                               "(start() ... stop(), or use it as a context manager)")
        joules = (self._end_mj - self._start_mj) / 1000.0
        seconds = self._end_s - self._start_s
        clocks = [mhz for mhz, _ in self._samples]
        return {
            "available": True, "joules": joules, "seconds": seconds,
            "mean_power_w": joules / seconds if seconds > 0 else None,
            "joules_per_block": joules / blocks if blocks else None,
            "median_sm_mhz": statistics.median(clocks) if clocks else None,
            "power_capped_share": (sum(capped for _, capped in self._samples)
                                   / len(self._samples)) if self._samples else None,
            "samples": len(self._samples)}


def _gpu_index(device) -> Optional[int]:
    """The GPU index of `device` (an int is one already); None for a non-CUDA device."""
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()
