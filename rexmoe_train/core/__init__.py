"""The method itself, torch-only: no megatron, no config, no process groups.

- :mod:`~rexmoe_train.core.reuse`: reuse groups (``ReusePlan``, ``ReuseGroup``) and megatron's
  pipeline split computed without megatron (``pipeline_chunks``);
- :mod:`~rexmoe_train.core.placement`: ``ExpertPlacement``, candidate -> (EP rank, local slot);
- :mod:`~rexmoe_train.core.psr`: ``PSRSchedule``, ``psr_allowed_mask``, ``PSRState``;
- :mod:`~rexmoe_train.core.gating`: the ``gate()`` reference for the three gatings;
- :mod:`~rexmoe_train.core.flops`: the FLOP count behind TFLOP/s and MFU;
- :mod:`~rexmoe_train.core.errors`: ``ConfigError``.

Everything above this package (config, model, parallel, training, cli) imports it; it imports
nothing of theirs (tests/test_import_layers.py enforces the direction).
"""
