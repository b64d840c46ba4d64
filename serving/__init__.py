"""Runtime side: local runners, the Triton repository writer, client and server, the batch and
stream pipelines.

Layers (enforced by tests/test_layers.py): serving imports the core (`cosa`) and, of
`cosa.export`, only `spec`, the artifact chooser and `tensorrt_engine`; no module of serving is
part of an import cycle (the Triton names live in `triton_names`, the `Runner` interface in
`runner`, so that the writer, the client and the runners need not import each other).
"""
