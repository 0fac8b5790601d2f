"""peft-orchestrator: sweep files, Ray Tune / Train, DeepSpeed, tasks and data, MLflow, the CLI."""
