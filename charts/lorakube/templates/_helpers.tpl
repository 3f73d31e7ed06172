{{/* Names: <release> when it already says "lorakube", else <release>-lorakube. */}}
{{- define "lorakube.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lorakube.serviceAccountName" -}}
{{- include "lorakube.fullname" . -}}-operator
{{- end -}}

{{- define "lorakube.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "lorakube.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lorakube
{{- end -}}

{{- define "lorakube.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "lorakube.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (.Values.trainerImage.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The namespace of the helm-test job: the release's when the operator watches it, else the
first watched namespace. */}}
{{- define "lorakube.testNamespace" -}}
{{- if or (not .Values.watch.namespaces) (has .Release.Namespace .Values.watch.namespaces) -}}
{{- .Release.Namespace -}}
{{- else -}}
{{- first .Values.watch.namespaces -}}
{{- end -}}
{{- end -}}

{{/* What the operator needs on jobs and their children, in every namespace it watches.
Every rule names the code that needs it (see operator/lorakube/manifests/rbac-operator.yaml). */}}
{{- define "lorakube.operatorRules" -}}
# Kopf lists and watches the jobs, patches its annotations and finalizer onto them; the reconciler
# reads a job fresh before each pass and deletes it once ttlSecondsAfterFinished ran out.
- apiGroups: [lorakube.io]
  resources: [loratrainingjobs]
  verbs: [get, list, watch, patch, delete]
# phase, conditions, nodes, lastFailure (merge patches of the status subresource).
- apiGroups: [lorakube.io]
  resources: [loratrainingjobs/status]
  verbs: [get, patch]
# Children carry ownerReferences with blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
- apiGroups: [lorakube.io]
  resources: [loratrainingjobs/finalizers]
  verbs: [update]
# The node pods: watched, created per attempt, deleted for a gang restart, suspend and the end.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
# The last log lines of a failed pod go into status.lastFailure.logTail.
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# One headless Service per job (rank 0's stable DNS name).
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
# Each job's trainer ServiceAccount, Role and RoleBinding (lorakube/rbac.py). The Role grants
# get/patch on loratrainingjobs/status, which the operator holds above: no bind/escalate needed.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
# One Event per transition.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Jobs labelled kueue.x-k8s.io/queue-name: the Workload of the gang's pod group says why the job is
# Queued (get); a group whose gated pods are being deleted is ended by deleting its Workload
# (docs/operator.md, "Kueue"). Harmless where Kueue is not installed.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, delete]
{{- end -}}

{{/* Cluster-scoped reads: a gang restart stuck on a Terminating pod reads that pod's Node. */}}
{{- define "lorakube.nodeRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [get]
{{- end -}}
