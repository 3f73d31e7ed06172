"""Pinned versions of every binary localcluster builds, and the ldflags that stamp them.

Module zips carry no git metadata, so without ``-X`` stamping kube-apiserver reports
``v0.0.0-master`` and helm a bare ``v3.22`` with a default KubeVersion of 1.20. Tools such as
``kubectl version``, helm's ``Capabilities`` and client libraries parse these strings, so each
binary is stamped with the real release it was built from.
"""

from __future__ import annotations

from dataclasses import dataclass

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
VERSITYGW_VERSION = "v1.8.0"
FAKE_GCS_SERVER_VERSION = "v1.56.1"
# An npm package, not a Go module: localcluster/azurite.py installs it from the lock file in
# localcluster/npm/azurite (which pins this version and every dependency).
AZURITE_VERSION = "3.37.0"
KUEUE_VERSION = "v0.17.0"
TRAINING_OPERATOR_VERSION = "v1.8.1"

# Fixed so that a rebuild of the same pins gives the same binary (and the same cache key).
BUILD_DATE = "1970-01-01T00:00:00Z"


@dataclass(frozen=True)
class GoTarget:
    """One binary: where its Go package lives and how to stamp it."""

    name: str
    package: str
    # Directory (relative to localcluster/go) of the tools module that pins it; None means
    # `go install package@version`, which works for modules without replace directives.
    module_dir: str | None
    version: str
    ldflags: tuple[str, ...]


def _semver_parts(version: str) -> tuple[str, str, str]:
    major, minor, patch = version.lstrip("v").split(".")
    return major, minor, patch


def kubernetes_ldflags(version: str = KUBERNETES_VERSION) -> tuple[str, ...]:
    """The keys hack/lib/version.sh sets, for both the server and the client-go copy."""
    major, minor, _ = _semver_parts(version)
    values = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": BUILD_DATE,
    }
    flags: list[str] = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in values.items()]
    return tuple(flags)


def helm_ldflags(
    version: str = HELM_VERSION, kube_version: str = KUBERNETES_VERSION
) -> tuple[str, ...]:
    """Helm's Makefile flags: real version, and the cluster's minor as default KubeVersion."""
    kube_major, kube_minor, _ = _semver_parts(kube_version)
    return (
        f"-X helm.sh/helm/v3/internal/version.version={version}",
        "-X helm.sh/helm/v3/internal/version.metadata=",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
        f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor={kube_major}",
        f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={kube_minor}",
        f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor={kube_major}",
        f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={kube_minor}",
    )


def etcd_ldflags(version: str = ETCD_VERSION) -> tuple[str, ...]:
    # etcd's own version string comes from its api module; only the git SHA is build-time.
    return (f"-X go.etcd.io/etcd/api/v3/version.GitSHA={version}",)


def targets() -> tuple[GoTarget, ...]:
    """Everything `python -m localcluster build` produces, in build order."""
    k8s = kubernetes_ldflags()
    return (
        GoTarget("etcd", "go.etcd.io/etcd/server/v3", "etcd", ETCD_VERSION, etcd_ldflags()),
        *(
            GoTarget(name, f"k8s.io/kubernetes/cmd/{name}", "k8s", KUBERNETES_VERSION, k8s)
            for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
        ),
        GoTarget("helm", "helm.sh/helm/v3/cmd/helm", None, HELM_VERSION, helm_ldflags()),
    )


def versitygw_ldflags(version: str = VERSITYGW_VERSION) -> tuple[str, ...]:
    # Its Makefile stamps these three; unstamped it reports "git"/"norev".
    return (f"-X main.Version={version}", f"-X main.Build={version}", f"-X main.BuildTime={BUILD_DATE}")


def s3_targets() -> tuple[GoTarget, ...]:
    """`python -m localcluster build s3`: an S3 server for the object-storage tests (versitygw with
    its POSIX backend), cached under its own key so the control plane's cache stays valid."""
    return (GoTarget("versitygw", "github.com/versity/versitygw/cmd/versitygw", None, VERSITYGW_VERSION,
                     versitygw_ldflags()),)


def gcs_targets() -> tuple[GoTarget, ...]:
    """`python -m localcluster build gcs`: a Google Cloud Storage emulator for the gs:// tests
    (fake-gcs-server, JSON API over HTTP), cached under its own key like the S3 server. Its
    source stamps no version: `go version -m` reads the module version (build.check_version)."""
    return (GoTarget("fake-gcs-server", "github.com/fsouza/fake-gcs-server", None, FAKE_GCS_SERVER_VERSION, ()),)


def kueue_ldflags(version: str = KUEUE_VERSION) -> tuple[str, ...]:
    """What Kueue's Makefile stamps; the manager logs it at start ("Initializing", gitVersion)."""
    return (
        f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={version}",
        "-X sigs.k8s.io/kueue/pkg/version.GitCommit=",
        f"-X sigs.k8s.io/kueue/pkg/version.BuildDate={BUILD_DATE}",
    )


def kueue_targets() -> tuple[GoTarget, ...]:
    """Kueue's manager, an optional set cached under its own key: the control plane does not need
    it, and adding it must not invalidate (and rebuild) the binaries above."""
    return (GoTarget("kueue", "sigs.k8s.io/kueue/cmd/kueue", "kueue", KUEUE_VERSION, kueue_ldflags()),)


def training_operator_targets() -> tuple[GoTarget, ...]:
    """Kubeflow's training-operator (the PyTorchJob controller), the peer of the operator benchmark;
    optional and keyed on its own like Kueue. Its release stamps no version into the binary: the
    module version Go embeds is what `check_version` reads."""
    return (GoTarget("training-operator", "github.com/kubeflow/training-operator/cmd/training-operator.v1",
                     "training-operator", TRAINING_OPERATOR_VERSION, ()),)


# The sets `python -m localcluster build [SET]` knows; "core" is what the cluster itself runs.
TARGET_SETS = {"core": targets, "kueue": kueue_targets, "s3": s3_targets, "gcs": gcs_targets,
               "training-operator": training_operator_targets}
