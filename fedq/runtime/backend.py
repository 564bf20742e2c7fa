"""Run host objects as Ray actors (default) or in the driver process (tests, debugging).

Ray starts embedded and capped to the machine (CPUs, object-store memory) unless ``ray_address``
attaches to an existing cluster. Only small scalars and lists travel through Ray; tensors travel
over the transport.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from fedq.config import RuntimeConfig

log = logging.getLogger(__name__)


#: GPU share each Ray host asks for with ``runtime.device: cuda`` (up to 100 hosts per GPU).
GPU_SHARE = 0.01


def wants_gpu(rt: RuntimeConfig) -> bool:
    if rt.device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return rt.device == "cuda"


class InProcessBackend:
    name = "inprocess"

    def spawn(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        return cls(*args, **kwargs)

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
        self._started = False
        if not ray.is_initialized():
            if rt.ray_address:
                ray.init(address=rt.ray_address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(
                    num_cpus=rt.num_cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    object_store_memory=rt.object_store_mb << 20,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    _temp_dir=tempfile.mkdtemp(prefix="fedq-ray-"),
                )
            self._started = True
        # runtime.device cuda: each host asks for a small share of a GPU so that Ray shows it
        # the device (CUDA_VISIBLE_DEVICES) and packs the server and workers onto one GPU
        self._gpu_share = GPU_SHARE if wants_gpu(rt) else 0.0

    def spawn(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        # Hosts use 0 logical CPUs so N workers + a server always schedule on a small machine;
        # each host caps its own torch threads instead.
        actor: Any = self.ray.remote(cls).options(
            num_cpus=0, num_gpus=self._gpu_share, max_concurrency=4
        )
        return actor.remote(*args, **kwargs)

    def call(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method).remote(*args)

    def get(self, futures: Sequence[Any], timeout: float | None = None) -> list[Any]:
        return list(self.ray.get(list(futures), timeout=timeout))

    def shutdown(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()


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
