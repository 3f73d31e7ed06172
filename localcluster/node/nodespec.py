"""What a node offers (kept import-light: the control plane builds these before any client)."""

from __future__ import annotations

from dataclasses import dataclass

GPU_RESOURCE = "nvidia.com/gpu"
MAX_PODS = "110"


@dataclass(frozen=True)
class NodeSpec:
    """One node the daemon registers. `gpus` is advertised as nvidia.com/gpu."""

    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = 0

    def resources(self) -> dict[str, str]:
        out = {"cpu": self.cpu, "memory": self.memory, "pods": MAX_PODS,
               "ephemeral-storage": "100Gi"}
        if self.gpus:
            out[GPU_RESOURCE] = str(self.gpus)
        return out

    def to_arg(self) -> str:
        return f"{self.name}:{self.gpus}:{self.cpu}:{self.memory}"

    @classmethod
    def from_arg(cls, text: str) -> "NodeSpec":
        """Parse `name[:gpus[:cpu[:memory]]]` (the --node flag)."""
        parts = text.split(":")
        if not parts[0] or len(parts) > 4:
            raise ValueError(f"--node {text!r}: expected name[:gpus[:cpu[:memory]]], e.g. node-0:1")
        try:
            gpus = int(parts[1]) if len(parts) > 1 and parts[1] else 0
        except ValueError:
            raise ValueError(f"--node {text!r}: gpus must be an integer") from None
        spec = cls(name=parts[0], gpus=gpus)
        if len(parts) > 2 and parts[2]:
            spec = cls(spec.name, cpu=parts[2], gpus=gpus)
        if len(parts) > 3 and parts[3]:
            spec = cls(spec.name, cpu=spec.cpu, memory=parts[3], gpus=gpus)
        return spec
