{{/* The name (app.kubernetes.io/name): the same as the kustomize base's. Not .Chart.Name,
which is a parent chart's alias (sandboxReconciler) when this chart is a dependency. */}}
{{- define "sandbox-reconciler.name" -}}
{{- default "sandbox-reconciler" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name when it contains the chart's name, else RELEASE-NAME. */}}
{{- define "sandbox-reconciler.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "sandbox-reconciler.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The workload's component label: daemon or cronjob. */}}
{{- define "sandbox-reconciler.component" -}}
{{- if eq .Values.mode "cronjob" }}cronjob{{ else }}daemon{{ end }}
{{- end }}

{{/* Labels of every object. Selectors use only name and component (never instance or
version), like the kustomize base, so an upgrade never orphans running pods. */}}
{{- define "sandbox-reconciler.labels" -}}
app.kubernetes.io/name: {{ include "sandbox-reconciler.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: sandbox-reconciler
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sandbox-reconciler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sandbox-reconciler.name" . }}
app.kubernetes.io/component: {{ include "sandbox-reconciler.component" . }}
{{- end }}

{{/* Labels of pod templates (and of the CronJob's jobTemplate). */}}
{{- define "sandbox-reconciler.podLabels" -}}
{{ include "sandbox-reconciler.selectorLabels" . }}
app.kubernetes.io/part-of: sandbox-reconciler
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The profile's file in files/config/ (a byte-for-byte copy of the repository's config/). */}}
{{- define "sandbox-reconciler.profileFile" -}}
{{- $files := dict "bare-pod" "centaur.toml" "agent-sandbox" "centaur-agent-sandbox.toml" "migration" "centaur-migration.toml" }}
{{- required (printf "profile must be one of bare-pod, agent-sandbox, migration, not %q" .Values.profile) (get $files .Values.profile) }}
{{- end }}

{{/* The configuration files, in the order they are layered. */}}
{{- define "sandbox-reconciler.configFiles" -}}
{{- $files := list "default.toml" (include "sandbox-reconciler.profileFile" .) }}
{{- if .Values.siteConfig }}{{ $files = append $files "site.toml" }}{{ end }}
{{- join "," $files }}
{{- end }}

{{- define "sandbox-reconciler.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The watched namespaces, comma-separated ("" = the release namespace, from a fieldRef). */}}
{{- define "sandbox-reconciler.watchNamespaces" -}}
{{- join "," .Values.watchNamespaces }}
{{- end }}

{{/* The reconciler's container, shared by the Deployment and the CronJob. The caller passes
(list $ "extra arg" ...): the extra arguments go before --log-format. */}}
{{- define "sandbox-reconciler.container" -}}
{{- $ := index . 0 }}
- name: sandbox-reconciler
  image: {{ include "sandbox-reconciler.image" $ }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  args:
    {{- range splitList "," (include "sandbox-reconciler.configFiles" $) }}
    - --config=/etc/sandbox-reconciler/{{ . }}
    {{- end }}
    {{- range rest . }}
    - {{ . }}
    {{- end }}
    - --log-format=json
  env:
    - name: DATABASE_URL
      valueFrom:
        secretKeyRef:
          name: {{ $.Values.database.existingSecret }}
          key: {{ $.Values.database.key }}
    - name: SANDBOX_RECONCILER__CLUSTER__NAMESPACES
      {{- if $.Values.watchNamespaces }}
      value: {{ include "sandbox-reconciler.watchNamespaces" $ | quote }}
      {{- else }}
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
      {{- end }}
    {{- with $.Values.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* What follows the container's env: resources, security context, mounts. */}}
{{- define "sandbox-reconciler.containerTail" -}}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  privileged: false
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
volumeMounts:
  - name: config
    mountPath: /etc/sandbox-reconciler
    readOnly: true
{{- end }}

{{/* Pod-level settings shared by the Deployment and the CronJob. */}}
{{- define "sandbox-reconciler.podSecurity" -}}
serviceAccountName: {{ include "sandbox-reconciler.fullname" . }}
automountServiceAccountToken: true
# Longer than shutdown.timeout_seconds (30): an in-flight apply batch commits or rolls back
# before the kubelet sends SIGKILL.
terminationGracePeriodSeconds: 45
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Pod template annotations: a checksum of the configuration, so a change rolls the pods. */}}
{{- define "sandbox-reconciler.podAnnotations" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "sandbox-reconciler.volumes" -}}
volumes:
  - name: config
    configMap:
      name: {{ include "sandbox-reconciler.fullname" . }}-config
{{- end }}
