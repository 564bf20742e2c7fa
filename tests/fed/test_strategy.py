import torch

from fedq.config import FedConfig
from fedq.fed.strategy import FedAdam, FedProx, Strategy, make_strategy
from fedq.rounds import select_clients, weighted_mean


def test_weighted_mean_is_sample_weighted() -> None:
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([0.0, 4.0])}
    m = weighted_mean([(a, 3.0), (b, 1.0)])
    assert torch.allclose(m["w"], torch.tensor([0.75, 1.0]))


def test_fedavg_applies_mean_delta() -> None:
    s = Strategy(FedConfig())
    g = {"w": torch.ones(3)}
    new = s.aggregate(g, [({"w": torch.full((3,), 2.0)}, 1.0), ({"w": torch.zeros(3)}, 1.0)])
    assert torch.allclose(new["w"], torch.full((3,), 2.0))
    assert torch.equal(g["w"], torch.ones(3))  # the input is not modified


def test_selection_reproducible_and_distinct() -> None:
    everyone = list(range(100))
    a = select_clients(3, everyone, 10, seed=1)
    assert a == select_clients(3, everyone, 10, seed=1)
    assert len(set(a)) == 10 and all(0 <= c < 100 for c in a) and a == sorted(a)
    assert a != select_clients(4, everyone, 10, seed=1)
    assert a != select_clients(3, everyone, 10, seed=2)
    # the draw depends on the pool, not on the order it is listed in
    assert select_clients(3, everyone[::-1], 10, seed=1) == a
    # a pool without some clients (not registered, out of privacy budget): drawn from it only
    pool = [c for c in everyone if c % 3]
    b = select_clients(3, pool, 10, seed=1)
    assert len(set(b)) == 10 and set(b) <= set(pool)
    assert select_clients(0, [7, 2], 5, seed=0) == [2, 7]  # k above the pool: all of it


def test_fedprox_sends_mu() -> None:
    assert FedProx(FedConfig(proximal_mu=0.2)).client_scalars() == {"proximal_mu": 0.2}


def test_fedadam_matches_hand_computed_step_and_checkpoints() -> None:
    cfg = FedConfig(strategy="fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    s = make_strategy(cfg)
    assert isinstance(s, FedAdam)
    g = {"w": torch.zeros(2)}
    d = torch.tensor([1.0, -2.0])
    new = s.aggregate(g, [({"w": d}, 1.0)])
    m = 0.1 * d
    v = 0.01 * d * d
    assert torch.allclose(new["w"], 0.1 * m / (v.sqrt() + 1e-3))
    s2 = make_strategy(cfg)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(
        s2.aggregate(new, [({"w": d}, 1.0)])["w"], s.aggregate(new, [({"w": d}, 1.0)])["w"]
    )
