"""The run planner (``rexmoe-plan``): one training step of each distinct rank, simulated on fake
tensors under a fake process group, measured for memory, traffic and (through ``timing``) time."""
