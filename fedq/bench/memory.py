"""Peak memory of a process tree (the driver plus Ray's and its workers' processes), sampled."""

from __future__ import annotations

import threading

import psutil


class TreeMemorySampler:
    """Samples the summed RSS and PSS of a process (``pid``; default this one) and all its
    descendants every ``interval`` seconds; PSS splits shared pages between processes, so it is
    the honest total. :meth:`track` adds further trees (processes started beside the first one,
    not under it); each process is counted once."""

    def __init__(self, interval: float = 0.5, pid: int | None = None) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        #: the largest RSS each process reached, by its command line (first 60 characters;
        #: a Ray actor's reads ``ray::<Class>...``)
        self.peak_by_process: dict[str, int] = {}
        self._roots: list[int | None] = [pid]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def track(self, pid: int) -> None:
        """Sample the tree of ``pid`` too, from now on."""
        self._roots = [*self._roots, pid]

    def _tree(self) -> dict[int, psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        for pid in self._roots:
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:  # the process sampled has ended
                continue
            procs.update((p.pid, p) for p in tree)
        return procs

    def _sample(self) -> None:
        rss = pss = n = 0
        for p in self._tree().values():
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            n += 1
            try:
                title = " ".join(p.cmdline())[:60] or p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                title = str(p.pid)
            key = f"{title} [{p.pid}]"
            self.peak_by_process[key] = max(self.peak_by_process.get(key, 0), info.rss)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, n)

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
