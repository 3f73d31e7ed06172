"""What a node offers (kept import-light: the control plane builds these before any client)."""

from __future__ import annotations

from dataclasses import dataclass

GPU_RESOURCE = "nvidia.com/gpu"
MAX_PODS = 110  # kubelet's default --max-pods


@dataclass(frozen=True)
class NodeSpec:
    """One node the daemon registers. `gpus` is advertised as nvidia.com/gpu; `pods` is the
    node's pod capacity (kubelet's --max-pods; raise it to run thousands of pods on a few nodes)."""

    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = 0
    pods: int = MAX_PODS

    def resources(self) -> dict[str, str]:
        out = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods),
               "ephemeral-storage": "100Gi"}
        if self.gpus:
            out[GPU_RESOURCE] = str(self.gpus)
        return out

    def to_arg(self) -> str:
        return f"{self.name}:{self.gpus}:{self.cpu}:{self.memory}:{self.pods}"

    @classmethod
    def from_arg(cls, text: str) -> "NodeSpec":
        """Parse `name[:gpus[:cpu[:memory[:pods]]]]` (the --node flag)."""
        parts = text.split(":")
        if not parts[0] or len(parts) > 5:
            raise ValueError(f"--node {text!r}: expected name[:gpus[:cpu[:memory[:pods]]]], "
                             "e.g. node-0:1")
        name, gpus, cpu, memory, pods = (parts + [""] * 4)[:5]
        try:
            gpu_count = int(gpus) if gpus else 0
        except ValueError:
            raise ValueError(f"--node {text!r}: gpus must be an integer") from None
        try:
            pod_count = int(pods) if pods else MAX_PODS
        except ValueError:
            pod_count = 0
        if pod_count < 1:
            raise ValueError(f"--node {text!r}: pods must be a positive integer, e.g. node-0:0:8:32Gi:500")
        return cls(name, cpu=cpu or cls.cpu, memory=memory or cls.memory, gpus=gpu_count,
                   pods=pod_count)
