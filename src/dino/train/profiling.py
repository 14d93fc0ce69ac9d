"""Where the time of a real training run goes: ``run.profile_steps=N`` profiles N steps of ``dino train``.

The profile starts after ``skip`` steps (compilation, CUDA-graph recording and the allocator's growth
happen in the first ones) and covers the data path as it runs in the loop — loader workers, decoding and
augmentation in the background thread on a GPU — together with the step. It writes into the run directory:

- ``profile.json``: wall and device (kernel) milliseconds per step, the device's busy fraction (kernel
  time summed over all streams / wall time: well below 1, the host or the data path sets the pace; it
  can exceed 1 where streams overlap), kernels per step, and the device time per CUDA stream (on a GPU
  the step and the data path run on streams of their own);
- ``profile.txt``: the operators and kernels taking the most device time and the most host time;
- ``profile_trace.json``: the timeline, for Perfetto (https://ui.perfetto.dev) or chrome://tracing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)

PROFILE_SKIP = 10  # steps run before the profile starts


class StepProfiler:
    """Call :meth:`step` after every training step; the profile is written once ``steps`` steps after
    the first ``skip`` are done (and never if the run ends before). ``steps=0`` or ``enabled=False``:
    nothing is done."""

    def __init__(
        self, steps: int, run_dir: Path, device: torch.device, skip: int = PROFILE_SKIP, enabled: bool = True
    ) -> None:
        self.steps, self.skip, self.run_dir, self.device = steps, skip, Path(run_dir), device
        self.active = enabled and steps > 0
        self.seen = 0
        self._profile: profile | None = None
        self._start = 0.0

    def step(self) -> None:
        if not self.active:
            return
        self.seen += 1
        if self.seen == self.skip:
            self._sync()
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profile = profile(activities=activities)
            self._profile.start()
            self._start = time.perf_counter()
        elif self.seen == self.skip + self.steps and self._profile is not None:
            self._sync()
            wall = time.perf_counter() - self._start
            self._profile.stop()
            self.active = False
            self._write(self._profile, wall)
            self._profile = None

    def close(self) -> None:
        """Stop a profile still running (the run ended first); nothing is written."""
        if self._profile is not None:
            self._profile.stop()
            self._profile = None
        self.active = False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write(self, prof: profile, wall: float) -> None:
        on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        per_stream: dict[str, float] = defaultdict(float)
        for e in on_device:
            per_stream[str(getattr(e, "device_resource_id", "?"))] += e.device_time / 1e3
        steps = self.steps
        summary = {
            "steps": steps,
            "skipped_steps": self.skip,
            "wall_ms_per_step": 1e3 * wall / steps,
            "device_ms_per_step": sum(per_stream.values()) / steps,
            "device_busy_fraction": sum(per_stream.values()) / 1e3 / wall if on_device else None,
            "kernels_per_step": len(on_device) / steps,
            "device_ms_per_step_by_stream": {k: v / steps for k, v in sorted(per_stream.items())},
        }
        (self.run_dir / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
        events = prof.key_averages()
        sort = "self_cuda_time_total" if on_device else "self_cpu_time_total"
        tables = [events.table(sort_by=sort, row_limit=40)]
        if on_device:
            tables.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
        (self.run_dir / "profile.txt").write_text("\n\n".join(tables) + "\n")
        prof.export_chrome_trace(str(self.run_dir / "profile_trace.json"))
        log.info(
            "profiled %d steps: %.1f ms per step, device busy %s; written to %s",
            steps,
            summary["wall_ms_per_step"],
            "n/a" if summary["device_busy_fraction"] is None else f"{summary['device_busy_fraction']:.0%}",
            self.run_dir / "profile.txt",
        )
