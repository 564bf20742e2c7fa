"""Wire format: ``PackedTensor`` <-> protobuf with full validation of untrusted input, and chunking.

WARNING: never unpickle anything here; every byte from the network is parsed as protobuf and
validated before any tensor is allocated.
"""
