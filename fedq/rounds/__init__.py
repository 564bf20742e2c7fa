"""The round protocol both modes share, as plain classes: the server's round engine
(:mod:`fedq.rounds.engine`) and a client process's node (:mod:`fedq.rounds.node`).

The server owns the loop: clients register, keep a work stream open and pull their tasks; the
server selects among the available registered clients, charges privacy, publishes tasks, collects
updates until all arrived or the round deadline passed, and closes the round all or nothing.
Federated and split mode plug in a workload (:mod:`fedq.rounds.workload`); ``fedq simulate``,
``fedq serve`` and ``fedq join`` all run this same code (docs/design.md §4).

This package knows nothing of gRPC: the transport calls the engine as its handler, and the node
talks through a connection object.
"""

from fedq.rounds.average import weighted_mean
from fedq.rounds.roster import client_name, client_seed, select_clients

__all__ = ["client_name", "client_seed", "select_clients", "weighted_mean"]
