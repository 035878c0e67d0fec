"""Surviving the cluster: a run's attempts on disk and the process-lifetime helpers
(:mod:`.attempts`, torch-free so the launcher reads it without megatron), the hang watchdog
(:mod:`.watchdog`), the straggler report (:mod:`.straggler`), failure classification
(:mod:`.failures`), the launcher's agent (:mod:`.launcher`), stop signals before torch loads and a
hung-up terminal (:mod:`.signals`) and tracebacks kept off the terminal (:mod:`.stray_errors`).
Nothing here is imported on ``import rexmoe_train.resilience``: the launcher loads only what it reads."""
