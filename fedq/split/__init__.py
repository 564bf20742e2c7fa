"""Split learning and SplitFed with AMAQ-coded cuts (docs/algorithms.md §1 and §4).

- :mod:`fedq.split.models`: cutting BERT-like encoders and LLaMA-like causal LMs into a client
  bottom and a server top (LoRA via PEFT), with optional quantizers at every block boundary.
- :mod:`fedq.split.codecs`: building the quantizers of each boundary and direction from config.
- :mod:`fedq.split.protocol`: the split workload of the round engine (:mod:`fedq.rounds`): the
  server's step and FedAvg of client LoRA, and the client's task runner, over any connection
  (gRPC or in-process loopback).
- :mod:`fedq.split.privacy`: DP on the activations sent (``privacy.mechanism: activations``).

Where they run lives in :mod:`fedq.runtime` (imports flow split -> runtime):
:mod:`fedq.runtime.simulate` (``fedq simulate``, either mode) and :mod:`fedq.runtime.deploy`
(``fedq serve`` / ``fedq join``); ``fedq bench split --link`` runs server and client in two
network namespaces over a shaped veth (:mod:`fedq.bench.netlink`).

Importing this package imports nothing heavy (config only); torch-side modules are imported by
name.
"""
