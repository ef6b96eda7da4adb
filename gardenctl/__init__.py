"""gardenctl: keep a garden of vLLM workers in the state one YAML file declares."""

__version__ = "0.1.0"
