"""Test infrastructure that is no part of fedq: an in-process connection (``loopback``),
network namespaces with one veth pair per client (``netns``), and the import graph of fedq with
the import rules of docs/design.md (``imports``, for the policy tests).

Tests import it as ``support`` (``from support.loopback import LoopbackConnection``): pytest puts
``tests/`` on ``sys.path`` when it loads ``tests/conftest.py`` (``tests/`` is no package). What
``fedq bench`` needs at run time lives in :mod:`fedq.bench` instead (the namespaces and shaped
link of ``fedq bench split --link``, the two-node Ray cluster: :mod:`fedq.bench.netlink`)."""
