"""evomerge: evolutionary search for LLM merge recipes, exported as standard mergekit YAML."""

__version__ = "0.1.0"
