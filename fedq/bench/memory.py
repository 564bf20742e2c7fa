"""Peak memory of a process tree (the driver plus Ray's and its workers' processes), sampled."""

from __future__ import annotations

import threading

import psutil


class TreeMemorySampler:
    """Samples the summed RSS and PSS of a process (``pid``; default this one) and all its
    descendants every ``interval`` seconds; PSS splits shared pages between processes, so it is
    the honest total."""

    def __init__(self, interval: float = 0.5, pid: int | None = None) -> None:
        self.interval = interval
        self.pid = pid
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # the process sampled has ended
            return
        rss = pss = 0
        for p in tree:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeMemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
