from rexmoe_train.config.schema import ConfigError, ExperimentConfig, experiment_from_dict

__all__ = ["ConfigError", "ExperimentConfig", "experiment_from_dict"]
