"""Where runs execute, for either mode: the plain host objects (:mod:`~fedq.runtime.hosts`: the
server = round engine + the mode's workload + gRPC; a worker = a client node with its logical
clients), run as Ray actors made straight from those classes or in process
(:mod:`~fedq.runtime.backend`), where they go (:mod:`~fedq.runtime.placement`), the
``fedq simulate`` driver (:mod:`~fedq.runtime.simulate`), ``fedq serve`` / ``fedq join``
(:mod:`~fedq.runtime.deploy`), the run folder, checkpoints, sweeps and ``fedq shard``. Ray only
places and starts the hosts and carries small scalars; the rounds run over gRPC."""
