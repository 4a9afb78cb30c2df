"""The memory one training run adds: this process's resident memory sampled in a thread, peak minus start.

``ru_maxrss`` (what the library reports as ``RecoveryResult.peak_rss_mb``) is the process's all-time peak, so in a
bench that trains several methods one after another it cannot say what each one added. :class:`RssPeak` samples
``/proc/self/statm`` every ``interval`` seconds instead; :func:`training_memory` runs it from a Trainer's
``on_train_begin`` to its ``on_train_end`` (``recover(..., callbacks=[memory])``). Linux only; `None` elsewhere. A
spike shorter than the interval can be missed.

Run as a script it checks itself in a fresh process: an idle block adds (almost) nothing, a 64 MiB block held for a
while is seen even though it is freed before the end.

    python bench/memory.py
"""

from __future__ import annotations

import argparse
import os
import threading

__all__ = ["RssPeak", "training_memory"]


class RssPeak:
    """``with RssPeak() as memory: ...``; afterwards ``memory.increase_mb`` is the peak resident memory seen inside
    minus the value at entry (MiB), `None` where ``/proc/self/statm`` cannot be read.

    Args:
        interval (`float`, defaults to 0.02): seconds between samples.
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.increase_mb = interval, None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._start: float | None = None

    def _rss(self) -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page / 2**20
        except (OSError, ValueError, IndexError):
            return None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss() or 0.0)

    def start(self) -> RssPeak:
        self._start = self._rss()
        self._peak = self._start or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        if self._start is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss() or 0.0)
        self.increase_mb = self._peak - self._start

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def training_memory(interval: float = 0.02):
    """A ``TrainerCallback`` that samples resident memory while ``Trainer.train`` runs; its ``increase_mb`` afterwards
    (`None` until then, and where it cannot be measured). One per training run.

    Built on call, so that importing this module does not import transformers.
    """
    from transformers import TrainerCallback

    class TrainingMemory(TrainerCallback):
        def __init__(self):
            self._sampler = RssPeak(interval)

        @property
        def increase_mb(self) -> float | None:
            return self._sampler.increase_mb

        def on_train_begin(self, args, state, control, **kwargs):
            self._sampler.start()

        def on_train_end(self, args, state, control, **kwargs):
            self._sampler.stop()

    return TrainingMemory()


def _self_check() -> None:
    import time

    import torch

    with RssPeak() as idle:
        pass
    with RssPeak(interval=0.005) as busy:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so its pages are resident
        time.sleep(0.1)  # many sampling intervals
        del block
    if idle.increase_mb is None:
        print("resident memory cannot be read here (/proc/self/statm)")
        return
    print(f"idle: +{idle.increase_mb:.1f} MiB (expect < 16); 64 MiB block: +{busy.increase_mb:.1f} MiB (expect >= 48)")
    if not (idle.increase_mb < 16 and busy.increase_mb >= 48):
        raise SystemExit("the memory sampler missed the block or counted memory that was not there")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    _self_check()
