"""Experiments behind the results page (experiments/README.md); run each as a module from the repository root,
e.g. `python -m experiments.run_experiments --scale small`. `experiments.common` holds what they share."""
