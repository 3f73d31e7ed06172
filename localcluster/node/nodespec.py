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
        name, gpus, cpu, memory = (parts + [""] * 3)[:4]
        try:
            gpu_count = int(gpus) if gpus else 0
        except ValueError:
            raise ValueError(f"--node {text!r}: gpus must be an integer") from None
        return cls(name, cpu=cpu or cls.cpu, memory=memory or cls.memory, gpus=gpu_count)
