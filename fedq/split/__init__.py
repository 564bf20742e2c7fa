"""Split learning and SplitFed with AMAQ-coded cuts (docs/algorithms.md §1 and §4).

- :mod:`fedq.split.models`: cutting BERT-like encoders and LLaMA-like causal LMs into a client
  bottom and a server top (LoRA via PEFT), with optional quantizers at every block boundary.
- :mod:`fedq.split.codecs`: building the quantizers of each boundary and direction from config.
- :mod:`fedq.split.protocol`: the plain-class step protocol (client step, server ``split_step``,
  FedAvg of client LoRA) over any connection (gRPC or in-process loopback).
- :mod:`fedq.split.privacy`: DP on the activations sent (``privacy.mechanism: activations``).

Where they run lives in :mod:`fedq.runtime` (imports flow split -> runtime):
:mod:`fedq.runtime.split_runner` (``fedq simulate`` with ``mode: split``) and
:mod:`fedq.runtime.netlink` (server and client in two network namespaces over a shaped veth).

Importing this package imports nothing heavy (config only); torch-side modules are imported by
name.
"""
