"""lorakube_trainer: the LoRA trainer that lorakube's pods run (also a standalone CLI)."""
