"""Helpers shared by the tests and the benchmarks; no tests here (no test_* module, nothing pytest collects).

A test module imports helpers from here, never another test module; a benchmark imports helpers from here,
and no test imports a benchmark. What lives here: tiny random models and their eager reference (models), a
byte-level tokenizer for them (tiny_tokenizer), adapters of all six kinds (adapter_zoo) and ways to spoil
them (adapter_mutations), a real gRPC server over a tiny model (harness), requests run side by side on an
engine service (streams), what an idle server may still hold (idle), and the soak (soak; its command line is
benchmarks/soak.py).
"""
