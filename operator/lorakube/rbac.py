"""Pure builders for the trainer's identity: one ServiceAccount, Role and RoleBinding per job.

Rank 0 patches `status.progress` (and, at the end, `status.artifacts`) of its own job, and that is
all a trainer pod may do with the API. A Role can name the one object it covers
(`resourceNames`), so each job gets its own Role for `loratrainingjobs/status` of that job only,
bound to the account its pods run as, all owned by the job so garbage collection removes them with
it. Users no longer install trainer RBAC per namespace; the operator can create these objects
because it holds every permission they grant (RBAC's escalation check).

RBAC cannot restrict *which* status fields a patch touches; the ValidatingAdmissionPolicy in
`manifests/trainer-status-policy.yaml` does: requests by the account a job's pods run as may change
only `status.progress` and `status.artifacts`. That policy spells the per-job account name in CEL as
`<job>` + TRAINER_ACCOUNT_SUFFIX, so the suffix must not change without it.
"""

from __future__ import annotations

from typing import Any

from lorakube_api import contract
from lorakube.spec import JobRef, JobSpec

TRAINER_ACCOUNT_SUFFIX = "-trainer"
RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"
# What rank 0 needs: read and merge-patch the status of its own job, nothing else.
TRAINER_VERBS = ("get", "patch")


def trainer_account_name(job_name: str) -> str:
    """<job>-trainer: the job's own ServiceAccount, and the name of its Role and RoleBinding."""
    return f"{job_name}{TRAINER_ACCOUNT_SUFFIX}"


def service_account(spec: JobSpec, job: JobRef) -> str:
    """The account the pods run as: the user's `spec.resources.serviceAccountName` (for cloud
    credentials and the like) or else the job's own."""
    return spec.resources.service_account_name or trainer_account_name(job.name)


def automount_token(spec: JobSpec, rank: int) -> bool | None:
    """`automountServiceAccountToken` of the rank's pod.

    Rank 0 always gets a token (progress reporting), whatever its account says. Other ranks never
    call the API: with the job's own account they get none. A user's own account keeps its own
    setting on the other ranks, because the user may have named it for credentials every rank uses;
    set `automountServiceAccountToken: false` on that account to keep its token off them.
    """
    if rank == 0:
        return True
    return False if spec.resources.service_account_name is None else None


def _metadata(job: JobRef) -> dict[str, Any]:
    return {
        "name": trainer_account_name(job.name),
        "namespace": job.namespace,
        "labels": {contract.LABEL_JOB_NAME: job.name, contract.LABEL_MANAGED_BY: contract.MANAGED_BY},
        "ownerReferences": [job.owner_reference()],
    }


def build_service_account(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job),
        # Pods opt in per rank (automount_token); a pod that does not say gets no token.
        "automountServiceAccountToken": False,
    }


def build_role(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "Role",
        "metadata": _metadata(job),
        "rules": [{
            "apiGroups": [contract.API_GROUP],
            "resources": [f"{contract.PLURAL}/status"],
            "resourceNames": [job.name],
            "verbs": list(TRAINER_VERBS),
        }],
    }


def build_role_binding(job: JobRef, account: str) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "RoleBinding",
        "metadata": _metadata(job),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": trainer_account_name(job.name)},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": job.namespace}],
    }


def build_trainer_access(spec: JobSpec, job: JobRef) -> list[dict[str, Any]]:
    """What the job's pods need before they exist, in creation order: the job's own ServiceAccount
    (unless the spec names one, which must exist already), the Role, and the binding of that Role
    to whichever account the pods run as."""
    objects = [] if spec.resources.service_account_name else [build_service_account(job)]
    return objects + [build_role(job), build_role_binding(job, service_account(spec, job))]
