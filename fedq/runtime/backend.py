"""Run host objects as Ray actors (default) or in the driver process (tests, debugging).

Ray starts embedded and capped to the machine (CPUs, object-store memory) unless ``ray_address``
attaches to an existing cluster. A run reserves its hosts in one placement group and starts each
in its bundle (:mod:`fedq.runtime.placement` decides what each asks for). Only small scalars and
lists travel through Ray; tensors travel over the transport.

An embedded Ray keeps its session files in ``<tmp>/fedq-ray-<driver pid>-*``, removed when the
run ends. A driver killed outright (SIGKILL) cannot clean up, and a few of Ray's helper processes
outlive it for a while; so every start first ends the processes still using the session folder of
a driver that is gone, and removes that folder: only fedq's own leftovers, nothing else.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedq.config import RuntimeConfig

log = logging.getLogger(__name__)


#: GPU share each Ray host asks for with ``runtime.device: cuda`` unless told otherwise
#: (``runtime.gpus_per_worker``), so that Ray shows it the device (CUDA_VISIBLE_DEVICES) and packs
#: the server and workers onto one GPU: up to 100 hosts per GPU.
GPU_SHARE = 0.01
#: Session folders of embedded Ray: ``<tmp>/fedq-ray-<driver pid>-<random>``.
RAY_TMP_PREFIX = "fedq-ray-"
_OWN_DIR = re.compile(rf"{RAY_TMP_PREFIX}(\d+)-")


def _uses(proc: Any, folder: str) -> bool:
    """Whether ``proc`` runs from, was started with, or holds a file under ``folder``."""
    try:
        if any(folder in arg for arg in proc.cmdline()):
            return True
        return any(f.path.startswith(folder) for f in proc.open_files())
    except Exception:  # gone meanwhile, or not ours to inspect
        return False


def clean_leftovers(tmp_root: str | None = None) -> list[int]:
    """End the processes of embedded Ray sessions whose driver is gone and remove their folders
    (module docstring). Returns the pids ended."""
    import psutil

    ended: list[int] = []
    for folder in Path(tmp_root or tempfile.gettempdir()).glob(f"{RAY_TMP_PREFIX}*"):
        m = _OWN_DIR.match(folder.name)
        if m is None or psutil.pid_exists(int(m.group(1))):
            continue  # not a fedq session folder, or its driver is still running
        for proc in psutil.process_iter():
            if proc.pid != os.getpid() and _uses(proc, str(folder)):
                try:
                    proc.kill()
                    ended.append(proc.pid)
                except psutil.Error:
                    continue
        psutil.wait_procs([psutil.Process(p) for p in ended if psutil.pid_exists(p)], timeout=5)
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed the leftovers of a killed run in %s (%d processes)", folder, len(ended))
    return ended


def wants_gpu(rt: RuntimeConfig) -> bool:
    if rt.device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return rt.device == "cuda"


class InProcessBackend:
    name = "inprocess"
    attached = False

    def spawn_at(
        self, bundle: int, ask: dict[str, float], cls: type, *args: Any, **kwargs: Any
    ) -> Any:
        return cls(*args, **kwargs)

    def cluster_cpus(self) -> int | None:
        return None

    def call(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method)(*args)

    def get(self, futures: Sequence[Any], timeout: float | None = None) -> list[Any]:
        return list(futures)

    def shutdown(self) -> None:
        return None


class RayBackend:
    name = "ray"

    def __init__(self, rt: RuntimeConfig) -> None:
        import ray

        self.ray = ray
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.attached = bool(rt.ray_address)  # an existing cluster, possibly of many nodes
        self._started = False
        self._tmp: str | None = None
        self._group: Any = None  # the run's placement group (reserve)
        if not ray.is_initialized():
            if rt.ray_address:
                ray.init(address=rt.ray_address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                clean_leftovers()
                self._tmp = tempfile.mkdtemp(prefix=f"{RAY_TMP_PREFIX}{os.getpid()}-")
                ray.init(
                    num_cpus=rt.num_cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    object_store_memory=rt.object_store_mb << 20,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    _temp_dir=self._tmp,
                )
            self._started = True

    def spawn_at(
        self, bundle: int, ask: dict[str, float], cls: type, *args: Any, **kwargs: Any
    ) -> Any:
        """An actor of ``cls`` holding ``ask`` (Ray resources) in bundle ``bundle`` of the run's
        placement group (:meth:`reserve`)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        custom = {k: v for k, v in ask.items() if k not in ("CPU", "GPU")}
        where = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=bundle)
        actor: Any = self.ray.remote(cls).options(
            num_cpus=ask.get("CPU", 0.0),
            num_gpus=ask.get("GPU", 0.0),
            resources=custom,
            max_concurrency=4,
            scheduling_strategy=where,
        )
        return actor.remote(*args, **kwargs)

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes: id, address, host name and total resources."""
        return [
            {
                "node_id": n["NodeID"],
                "node_ip": n["NodeManagerAddress"],
                "hostname": n["NodeManagerHostname"],
                "resources": dict(n["Resources"]),
            }
            for n in self.ray.nodes()
            if n.get("Alive")
        ]

    def available(self) -> dict[str, float]:
        return dict(self.ray.available_resources())

    def cluster_cpus(self) -> int | None:
        """CPUs of the whole cluster when attached to one (else None: the machine's count)."""
        if not self.attached:
            return None
        return int(self.ray.cluster_resources().get("CPU", 0)) or None

    def reserve(
        self, asks: list[dict[str, float]], strategy: str, timeout: float
    ) -> list[str] | None:
        """Reserve one bundle per ask in a placement group (``spread`` / ``pack``); returns the
        node id of each bundle, or None when Ray could not place them all within ``timeout``
        seconds (the group is then removed). The group ends with the run (:meth:`shutdown`)."""
        from ray.util import placement_group, placement_group_table, remove_placement_group

        group = placement_group(asks, strategy=strategy.upper())
        if not group.wait(timeout):
            remove_placement_group(group)
            return None
        self._group = group
        table = placement_group_table(group)["bundles_to_node_id"]
        return [str(table[i]) for i in range(len(asks))]

    def call(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method).remote(*args)

    def get(self, futures: Sequence[Any], timeout: float | None = None) -> list[Any]:
        return list(self.ray.get(list(futures), timeout=timeout))

    def shutdown(self) -> None:
        if self._group is not None and self.ray.is_initialized():
            from ray.util import remove_placement_group

            try:
                remove_placement_group(self._group)
            except Exception as e:  # the cluster may be gone already
                log.warning("could not remove the run's placement group: %s", e)
            self._group = None
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def stop_all(backend: InProcessBackend | RayBackend, server: Any) -> None:
    """Stop the server host (if it was started), then the backend. Used in ``finally`` blocks:
    a failing stop is logged, never raised, so it cannot mask the error being handled."""
    if server is not None:
        try:
            backend.get([backend.call(server, "stop")])
        except Exception as e:
            log.warning("server stop failed: %s", e)
    backend.shutdown()


def make_backend(rt: RuntimeConfig) -> InProcessBackend | RayBackend:
    return RayBackend(rt) if rt.backend == "ray" else InProcessBackend()
