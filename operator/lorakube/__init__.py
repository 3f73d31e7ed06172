"""lorakube: a Kubernetes operator for multi-node LoRA training of diffusion models.

Import nothing heavy here: the trainer image imports `lorakube.contract` without kopf installed.
"""

__version__ = "0.1.0"
