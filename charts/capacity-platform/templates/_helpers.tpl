{{/* Names and labels shared by every template. */}}

{{- define "capacity-platform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource name prefix: the release name, plus the chart name unless it is in it. */}}
{{- define "capacity-platform.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "capacity-platform.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "capacity-platform.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: capacity-platform
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: (list . "operator") */}}
{{- define "capacity-platform.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "capacity-platform.labels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Selector labels of one component: (list . "operator"); never change on upgrade. */}}
{{- define "capacity-platform.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "capacity-platform.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Object name of one component: (list . "agent") -> <fullname>-agent */}}
{{- define "capacity-platform.componentName" -}}
{{- printf "%s-%s" (include "capacity-platform.fullname" (index . 0)) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The username the API server gives a component's ServiceAccount: (list . "agent") */}}
{{- define "capacity-platform.serviceAccountUser" -}}
{{- $root := index . 0 }}
{{- printf "system:serviceaccount:%s:%s" $root.Release.Namespace (include "capacity-platform.componentName" .) }}
{{- end }}

{{- define "capacity-platform.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The webhook Service's DNS name, which its certificate is for. */}}
{{- define "capacity-platform.webhookHost" -}}
{{- printf "%s.%s.svc" (include "capacity-platform.componentName" (list . "webhook")) .Release.Namespace }}
{{- end }}

{{/* Whether to render ServiceMonitors: the value, or (null) whether the API exists. */}}
{{- define "capacity-platform.serviceMonitor" -}}
{{- $v := .Values.serviceMonitor.enabled }}
{{- if kindIs "invalid" $v }}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" }}true{{ end }}
{{- else if $v }}true{{ end }}
{{- end }}

{{/* The pod-level settings every component shares: (list . .Values.<component>) */}}
{{- define "capacity-platform.podCommon" -}}
{{- $root := index . 0 }}
{{- $c := index . 1 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
tolerations:
  {{- with $c.tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  # the platform's own pods stay on a node the operator fenced (it may be wrong about a node
  # whose agent alone died); only workloads are moved off it
  - {key: capacity.platform.dev/failed, operator: Exists, effect: NoExecute}
{{- end }}
