"""Write argocd-cm-patch.yaml from health.lua (the single source of the health check).

    python examples/argocd/render_cm_patch.py

The test on the example fails when the two differ, naming this command.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
KEY = "resource.customizations.health.lorakube.io_LoRATrainingJob"
HEADER = f"""\
# Adds the LoRATrainingJob health check to Argo CD. Merge it into the argocd-cm ConfigMap in Argo
# CD's namespace:
#   kubectl patch configmap argocd-cm -n argocd --type merge --patch-file argocd-cm-patch.yaml
# Generated from health.lua by render_cm_patch.py; edit health.lua, not this file.
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  labels:
    app.kubernetes.io/name: argocd-cm
    app.kubernetes.io/part-of: argocd
data:
  {KEY}: |
"""


def render(script: str) -> str:
    # A literal block scalar: every line indented, blank lines left empty.
    return HEADER + "".join(f"    {line}" if line.strip() else "\n" for line in script.splitlines(keepends=True))


if __name__ == "__main__":
    (HERE / "argocd-cm-patch.yaml").write_text(render((HERE / "health.lua").read_text()))
