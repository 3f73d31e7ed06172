"""Failure classification as data: ordered rules, the first that matches a failed pod wins.

The built-in rules below are the default table; a job's spec.runPolicy.failureRules go in front of
them (first match wins), so a user can say "this exit code or this log line is retryable / fatal /
not my fault" without a new operator release, the way JobSet's failure policy rules do.

Retryable failures restart the whole gang (all pods of the attempt go, attempt + 1, the trainer
resumes from its newest complete checkpoint); a user error fails the job at once, because running
the same arguments on the same data again would fail the same way.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Sequence

from lorakube import nodes
from lorakube_api import contract
from lorakube.pods import PodView
from lorakube.spec import FailureRuleSpec


class Action(enum.Enum):
    RESTART = "restart"
    FAIL = "fail"


@dataclasses.dataclass(frozen=True)
class Rule:
    reason: str                       # the condition reason the job gets
    matches: Callable[[PodView], bool]
    action: Action
    explain: str                      # the first words of the condition message
    # False: the cluster took the pod away (eviction, preemption, node loss); the restart is
    # counted in status.disruptions, bounded separately, instead of spending runPolicy.maxRestarts.
    spends_budget: bool = True
    # The pod's termination message has a line starting with this marker that says more than the
    # exit code (the trainer's preflight line): the condition message leads with that line.
    quotes: str | None = None


DISRUPTED = Rule("PodDisrupted", lambda p: p.disrupted, Action.RESTART,
                 "evicted, preempted or its node went away", spends_budget=False)


def _preflight_explain(retried: bool) -> str:
    checks = ", ".join(f"{code} {name}" for code, name in sorted(contract.PREFLIGHT_EXIT_CODES.items()))
    then = "retrying, a new pod's DNS record may lag" if retried else "fix the named input, retrying cannot help"
    return f"failed a preflight check before training ({then}; exit codes: {checks})"


RULES: tuple[Rule, ...] = (
    DISRUPTED,
    # Preflight (the trainer's first stage) names the input that is wrong; only rank 0's DNS name is
    # worth another attempt, every other check would fail the same way again.
    Rule(contract.PREFLIGHT_FAILED, lambda p: p.exit_code in contract.PREFLIGHT_RETRYABLE_EXIT_CODES, Action.RESTART,
         _preflight_explain(retried=True), quotes=contract.PREFLIGHT_FAILED),
    Rule(contract.PREFLIGHT_FAILED, lambda p: p.exit_code in contract.PREFLIGHT_EXIT_CODES, Action.FAIL,
         _preflight_explain(retried=False), quotes=contract.PREFLIGHT_FAILED),
    Rule("RetryableExit", lambda p: p.exit_code == contract.EXIT_RETRYABLE, Action.RESTART,
         "reported a retryable infrastructure failure (rendezvous, NCCL, storage)"),
    # Before KilledBySignal and UserError: the trainer caught a CUDA out-of-memory error. The same
    # spec on the same GPUs runs out again, so retrying only burns GPU hours; the message says
    # which spec fields trade memory for speed.
    Rule("OutOfMemory", lambda p: p.exit_code == contract.EXIT_OUT_OF_MEMORY, Action.FAIL,
         "ran out of GPU memory (CUDA out of memory; the same settings would run out again: lower "
         "spec.training.batchSize, set spec.training.gradientCheckpointing: true, or pick a higher DeepSpeed "
         "ZeRO stage in spec.training.strategy, deepspeed_stage_2 or deepspeed_stage_3)"),
    # A malformed dataset (found by preflight, or by the loader meeting an image it cannot decode):
    # the same data fails the same way; the condition leads with the trainer's "dataset: <file or
    # row>: ..." line, from the preflight line or the launcher's, whichever the pod printed last.
    Rule("InvalidDataset", lambda p: p.exit_code == contract.EXIT_DATASET_ERROR, Action.FAIL,
         "found a malformed dataset (fix the named file or row; retrying cannot help)",
         quotes=contract.DATASET_ERROR_PREFIX),
    # Before KilledBySignal and UserError: whatever the exit code, a GPU that reported a hardware
    # fault (an Xid, an uncorrectable ECC error) failed the job, not its arguments; the restart
    # keeps off that node (nodes.attribute) unless spec.runPolicy.nodeAvoidance is false.
    Rule("GpuHardwareError", lambda p: nodes.gpu_error_line(p.message) is not None, Action.RESTART,
         "hit a GPU hardware error (an NVIDIA Xid or uncorrectable ECC error in its log)"),
    Rule("KilledBySignal", lambda p: p.exit_code is not None and p.exit_code >= 128, Action.RESTART,
         "was killed by a signal (out of memory, node shutdown)"),
    Rule("UserError", lambda p: p.exit_code is not None and p.exit_code > 0, Action.FAIL,
         "failed"),
    # No exit code at all: the container never ran or its record is gone with the node.
    Rule("PodLost", lambda p: True, Action.RESTART, "was lost before it reported an exit code"),
)


@dataclasses.dataclass(frozen=True)
class Failure:
    pod: PodView
    rule: Rule

    @property
    def message(self) -> str:
        code = "" if self.pod.exit_code is None else f" with exit code {self.pod.exit_code}"
        quoted = quoted_line(self.pod.message, self.rule.quotes) if self.rule.quotes else None
        if quoted is not None:
            return f"{quoted} (pod {self.pod.name}, rank {self.pod.rank}, exit code {self.pod.exit_code})"
        detail = f": {self.pod.reason}" if self.pod.reason else ""
        return f"pod {self.pod.name} (rank {self.pod.rank}) {self.rule.explain}{code}{detail}"


def quoted_line(message: str | None, marker: str) -> str | None:
    """The last line of a termination message (or log tail) that holds `marker`, from the marker on."""
    for line in reversed((message or "").splitlines()):
        at = line.find(f"{marker}:")
        if at >= 0:
            return line[at:].strip()
    return None


def rule_from_spec(spec: FailureRuleSpec) -> Rule:
    """A user's rule as a table row. Conditions that are given must all hold; the message pattern
    is searched in the pod's termination message (the tail of its log on failure)."""
    pattern = re.compile(spec.on_message_pattern) if spec.on_message_pattern is not None else None

    def matches(pod: PodView) -> bool:
        if spec.on_exit_codes is not None and pod.exit_code not in spec.on_exit_codes:
            return False
        if spec.on_pod_reasons is not None and pod.reason not in spec.on_pod_reasons:
            return False
        return pattern is None or bool(pattern.search(pod.message or ""))

    action = Action.FAIL if spec.action == "Fail" else Action.RESTART
    return Rule(spec.name, matches, action, f"matched spec.runPolicy.failureRules {spec.name} ({spec.action})",
                spends_budget=spec.action == "Restart")


def rules_for(user_rules: Sequence[FailureRuleSpec] = ()) -> tuple[Rule, ...]:
    """The table one job is classified with: its own rules first, then the built-in ones."""
    return tuple(rule_from_spec(rule) for rule in user_rules) + RULES


def classify(pod: PodView, rules: Sequence[Rule] = RULES) -> Failure:
    return Failure(pod, next(rule for rule in rules if rule.matches(pod)))


def deleted_by_someone_else(pod: PodView) -> Failure:
    """A pod of the running attempt that is being deleted although the operator did not ask for it
    (a drain, a user): the gang has lost a rank. An eviction or preemption marks the pod
    DisruptionTarget as it deletes it, and stays a disruption here too."""
    if pod.disrupted:
        return Failure(pod, DISRUPTED)
    return Failure(pod, Rule("PodDeleted", lambda p: True, Action.RESTART, "was deleted while the job ran"))


def staging_stalled(pod: PodView, explain: str) -> Failure:
    """Rank 0 staged nothing new for spec.runPolicy.stagingProgressDeadlineSeconds. Retryable, and
    it spends maxRestarts: a download that stops is most often a connection that hung or a server
    that had trouble (a new attempt opens new connections, and may land on another node), while a source that never delivers ends the job once the budget is
    spent instead of cycling forever."""
    return Failure(pod, Rule(contract.STAGING_STALLED, lambda p: True, Action.RESTART, explain))


def missing(name: str, rank: int, attempt: int) -> Failure:
    """A pod of a running attempt that no longer exists at all."""
    ghost = PodView(name=name, rank=rank, attempt=attempt, owner_uid=None, phase="Unknown")
    return Failure(ghost, Rule("PodLost", lambda p: True, Action.RESTART, "disappeared while the job ran"))
