"""ReXMoE-train: Megatron-Core pretraining for ReXMoE (cross-layer expert reuse with progressive
scaling routing). Importing the package is cheap; subpackages that use megatron install the CPU
compatibility layer (``rexmoe_train.platform``) before importing it."""

__version__ = "0.1.0"
