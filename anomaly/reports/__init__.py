"""Reports over run records: tables, plots, HTML and wandb summaries of sweeps and benchmarks."""
