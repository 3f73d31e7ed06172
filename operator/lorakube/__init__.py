"""lorakube: a Kubernetes operator for multi-node LoRA training of diffusion models.

Import nothing heavy here: `lorakube operator --help` must answer without Kopf's start-up cost.
"""

__version__ = "0.1.0"
