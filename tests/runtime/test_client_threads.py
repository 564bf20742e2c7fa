"""A client process trains with the run's ``runtime.threads_per_worker`` torch threads, whether
it is a simulation worker or a ``fedq join`` site (both build their runner here): with torch's
default of one thread per core, a join process could sum a batch's float32 loss in another order
than the simulation and report a training loss that differs in its last bits."""

from __future__ import annotations

import torch

from fedq.config import config_from_dict
from fedq.runtime.hosts import make_runner
from fedq.wire.control import Joined


def test_the_runner_sets_the_runs_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(3)
            cfg = config_from_dict(
                {"model": {"name": "mlp", "hidden": 4}, "runtime": {"threads_per_worker": threads}}
            )
            joined = Joined(
                run_id="r",
                config_json="{}",
                client_index={"client-0": 0},
                num_classes=10,
                input_dim=64,
                fedq_version="x",
            )
            make_runner(cfg, {}, joined)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
