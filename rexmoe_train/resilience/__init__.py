"""Surviving the cluster: a run's attempts on disk and the process-lifetime helpers
(:mod:`.attempts`, torch-free so the launcher reads it without megatron), the hang watchdog
(:mod:`.watchdog`), the straggler report (:mod:`.straggler`) and failure classification
(:mod:`.failures`). Nothing here is imported on ``import rexmoe_train.resilience``: the launcher
loads only what it reads."""
