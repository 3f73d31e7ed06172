"""Pure functions that read a Pod (a dict in wire format) the way kubelet does.

Nothing here touches the API or the host: environment building, `$(VAR)` expansion,
downward-API field paths and resource quantities are all decided from the object alone,
so they are unit-testable and the daemon only wires the results into processes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


class PodSpecError(ValueError):
    """The pod asks for something the process node cannot do; the message names the field."""


class NotReadyYet(RuntimeError):
    """A referenced object (ConfigMap, Secret, ServiceAccount) is missing; kubelet retries too."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubelet's `$(VAR)` expansion: defined names are replaced, `$$` escapes a `$`,
    undefined or unterminated references stay literally as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "$" or i + 1 >= len(text):
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end < 0:
                out.append(text[i:])
                break
            name = text[i + 2:end]
            out.append(env[name] if name in env else text[i:end + 1])
            i = end + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['([^']*)'\]$")


def field_value(pod: Mapping[str, Any], field_path: str) -> str:
    """Resolve a downward-API `fieldRef.fieldPath` against the pod."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    match = _SUBSCRIPT.match(field_path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    simple: dict[str, Callable[[], Any]] = {
        "metadata.name": lambda: meta.get("name", ""),
        "metadata.namespace": lambda: meta.get("namespace", ""),
        "metadata.uid": lambda: meta.get("uid", ""),
        "spec.nodeName": lambda: spec.get("nodeName", ""),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", "default"),
        "status.podIP": lambda: status.get("podIP", ""),
        "status.hostIP": lambda: status.get("hostIP", ""),
        "status.podIPs": lambda: ",".join(p["ip"] for p in status.get("podIPs", [])),
        "status.hostIPs": lambda: ",".join(p["ip"] for p in status.get("hostIPs", [])),
        "metadata.labels": lambda: _kv_lines(meta.get("labels", {})),
        "metadata.annotations": lambda: _kv_lines(meta.get("annotations", {})),
    }
    if field_path not in simple:
        raise PodSpecError(
            f"fieldRef.fieldPath {field_path!r} is not supported; use one of "
            f"{sorted(simple)} or metadata.labels['key'] / metadata.annotations['key']"
        )
    return str(simple[field_path]())


def _kv_lines(values: Mapping[str, str]) -> str:
    # The downward API writes maps as sorted key="value" lines.
    return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))


_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|)$")


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("500m", "32Gi", "2") as a Decimal."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise PodSpecError(f"invalid resource quantity {text!r}; expected e.g. 500m, 2, 32Gi")
    number, suffix = match.groups()
    return Decimal(number) * Decimal(_SUFFIXES[suffix])


def resource_value(container: Mapping[str, Any], ref: Mapping[str, Any],
                   node_allocatable: Mapping[str, str]) -> str:
    """`resourceFieldRef`: the container's limit/request, falling back to node allocatable
    for unset limits (as kubelet does), rounded up in units of `divisor`."""
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or not name:
        raise PodSpecError(
            f"resourceFieldRef.resource {resource!r} must look like limits.cpu or requests.memory"
        )
    values = container.get("resources", {}).get(kind, {})
    raw = values.get(name)
    if raw is None:
        raw = node_allocatable.get(name, "0") if kind == "limits" else "0"
    divisor = parse_quantity(ref.get("divisor", "1") or "1")
    if divisor == 0:
        raise PodSpecError("resourceFieldRef.divisor must not be 0")
    return str(math.ceil(parse_quantity(raw) / divisor))


def all_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Init containers, then containers, as the pod lists them."""
    spec = pod.get("spec", {})
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def service_account_name(pod: Mapping[str, Any]) -> str:
    spec = pod.get("spec", {})
    return spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"


def wants_implicit_sa_mount(pod: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    """True when the ServiceAccount admission plugin did not add the token volume itself
    (it is off in some control planes) and the pod did not opt out."""
    if pod.get("spec", {}).get("automountServiceAccountToken") is False:
        return False
    return all(m.get("mountPath", "").rstrip("/") != SA_MOUNT_PATH
               for m in container.get("volumeMounts", []))


def container_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded; the image is ignored, so a command is required."""
    command = container.get("command") or []
    if not command:
        raise PodSpecError(
            f"containers[{container.get('name')}].command is empty: the process node runs "
            "commands on the host and does not read image entrypoints; set command"
        )
    return [expand(part, env) for part in [*command, *(container.get("args") or [])]]


ValueLookup = Callable[[str, str, str], str | None]
"""(kind 'configMap'|'secret', object name, key) -> value, None if the key is missing."""

MapLookup = Callable[[str, str], Mapping[str, str] | None]
"""(kind, object name) -> all data, None if the object is missing."""


def container_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    base: Mapping[str, str],
    lookup_value: ValueLookup,
    lookup_map: MapLookup,
    node_allocatable: Mapping[str, str],
) -> dict[str, str]:
    """The process environment: base (PATH, service host, ...) then envFrom then env,
    each `value` expanded against what is defined before it, as kubelet does."""
    env = dict(base)
    cname = container.get("name", "")
    for index, source in enumerate(container.get("envFrom") or []):
        prefix = source.get("prefix", "")
        for kind in ("configMap", "secret"):
            ref = source.get(f"{kind}Ref")
            if ref is None:
                continue
            data = lookup_map(kind, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                raise NotReadyYet(
                    f"containers[{cname}].envFrom[{index}]: {kind} {ref.get('name')!r} not found"
                )
            env.update({prefix + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        name = item.get("name", "")
        if "value" in item or "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        source = item["valueFrom"]
        where = f"containers[{cname}].env[{name}].valueFrom"
        if "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"].get("fieldPath", ""))
        elif "resourceFieldRef" in source:
            env[name] = resource_value(container, source["resourceFieldRef"], node_allocatable)
        else:
            for kind in ("configMap", "secret"):
                ref = source.get(f"{kind}KeyRef")
                if ref is None:
                    continue
                value = lookup_value(kind, ref.get("name", ""), ref.get("key", ""))
                if value is None:
                    if ref.get("optional"):
                        break
                    raise NotReadyYet(
                        f"{where}.{kind}KeyRef: key {ref.get('key')!r} of {kind} "
                        f"{ref.get('name')!r} not found"
                    )
                env[name] = value
                break
            else:
                raise PodSpecError(f"{where}: unsupported source {sorted(source)}")
    return env
