"""The runs recorded before issue 23's refactor: each scenario, shrunk to seconds by overrides.

Each case is a scenario file and the overrides that make it small. `record.py` ran them on the
commit before the refactor and wrote `recorded.json`; `test_recorded_runs.py` runs them again and
checks that every number (accuracy, loss, bytes per round and per run, bits, epsilon) is the same.
"""

from __future__ import annotations

INPROC = "runtime.backend=inprocess"

CASES: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("quickstart.yaml", ["rounds.count=2", INPROC]),
    "quickstart_ray": ("quickstart.yaml", ["rounds.count=2", "runtime.backend=ray"]),
    "quickstart_fedadam_median": (
        "quickstart.yaml",
        ["rounds.count=2", "fed.strategy=fedadam", "defence.aggregator=median", INPROC],
    ),
    "quickstart_central_dp": (
        "quickstart.yaml",
        ["rounds.count=2", "privacy.mechanism=central", "privacy.noise_multiplier=0.5", INPROC],
    ),
    "digits_100_clients": ("digits_100_clients.yaml", ["rounds.count=2", INPROC]),
    "digits_budget": ("digits_budget.yaml", ["rounds.count=2", INPROC]),
    "digits_dpsgd": ("digits_dpsgd.yaml", ["rounds.count=2", INPROC]),
    "digits_paper_cosine_client": ("digits_paper_cosine_client.yaml", ["rounds.count=2", INPROC]),
    "digits_paper_laplace": ("digits_paper_laplace.yaml", ["rounds.count=6", INPROC]),
    "mnist1d_cnn_fedprox": ("mnist1d_cnn_fedprox.yaml", ["rounds.count=2", INPROC]),
    "rotten_tomatoes_minilm_lora": (
        "rotten_tomatoes_minilm_lora.yaml",
        [
            "rounds.count=1",
            "rounds.clients_per_round=2",
            "data.max_train=200",
            "data.max_test=64",
            INPROC,
        ],
    ),
    "scale_mnist1d": (
        "scale_mnist1d.yaml",
        ["rounds.count=1", "data.num_samples=40000", "data.max_test=500", INPROC],
    ),
    "split_minilm_amaq": (
        "split_minilm_amaq.yaml",
        ["rounds.count=2", "split.local_steps=3", "data.max_train=300", "data.max_test=64", INPROC],
    ),
    "split_smollm2_amaq": (
        "split_smollm2_amaq.yaml",
        ["rounds.count=1", "rounds.eval_every=1", "split.local_steps=2", "data.max_test=16"],
    ),
    "split_tiny": ("split_tiny.yaml", []),
}

# What a run's outputs say that depends on time, place or process, and is left out of the check.
# ``control_bytes`` counts the registration and work-stream messages, and how many work-stream
# messages a round takes depends on when each client asks for work (the data bytes do not).
DROP_SUMMARY = {"placement", "wall_seconds"}
DROP_ROUND = {"seconds", "round_seconds", "control_bytes"}
