{{/*
The chart name, overridable with nameOverride.
*/}}
{{- define "rollfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A fully qualified app name, at most 63 characters (DNS label). A release whose name
already contains the chart name is used as is.
*/}}
{{- define "rollfleet.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "rollfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels: every object the chart renders carries them. part-of: rollfleet is also on
every pod the operator creates for a job, which is what the PodMonitor selects.
*/}}
{{- define "rollfleet.labels" -}}
helm.sh/chart: {{ include "rollfleet.chart" . }}
{{ include "rollfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rollfleet
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "rollfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rollfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "rollfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rollfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
A container image reference: `include "rollfleet.image" (dict "root" $ "name" "trainer")`
gives <image.registry>/<image.repositories.trainer>:<image.tag or appVersion>.
*/}}
{{- define "rollfleet.image" -}}
{{- $image := .root.Values.image }}
{{- $repository := index $image.repositories .name }}
{{- $tag := default .root.Chart.AppVersion $image.tag }}
{{- if $image.registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" $image.registry) $repository $tag }}
{{- else }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{/*
The NATS client URL the operator (and, through it, every job pod) uses: natsUrl when set;
else the NATS subchart's client Service (the nats chart names it like "rollfleet.fullname"
does: <release>-nats, or the release name when that already contains "nats").
*/}}
{{- define "rollfleet.natsUrl" -}}
{{- if .Values.natsUrl }}
{{- .Values.natsUrl }}
{{- else if .Values.nats.enabled }}
{{- $service := "" }}
{{- if .Values.nats.fullnameOverride }}
{{- $service = .Values.nats.fullnameOverride }}
{{- else }}
{{- $name := default "nats" .Values.nats.nameOverride }}
{{- if contains $name .Release.Name }}
{{- $service = .Release.Name }}
{{- else }}
{{- $service = printf "%s-%s" .Release.Name $name }}
{{- end }}
{{- end }}
{{- printf "nats://%s.%s.svc:4222" ($service | trunc 63 | trimSuffix "-") .Release.Namespace }}
{{- else }}
{{- fail "natsUrl is required when nats.enabled is false (the address of your own NATS server with JetStream)" }}
{{- end }}
{{- end }}

{{/*
The Secret with the NATS keys (`rollfleet nats-keys`, created by the user): natsAuth.secretName,
else <release>-nats-auth, the name the NATS subchart's values mount (nats.podTemplate.patch).
*/}}
{{- define "rollfleet.natsAuthSecretName" -}}
{{- if .Values.natsAuth.secretName }}
{{- .Values.natsAuth.secretName }}
{{- else }}
{{- printf "%s-nats-auth" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
