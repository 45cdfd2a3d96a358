{{/* The image reference: a value with a "/" is taken as it is. */}}
{{- define "ztunnel.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{ .Values.hub }}/{{ .Values.image }}:{{ .Values.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* istiod's address for certificates and xDS. */}}
{{- define "ztunnel.istiod" -}}
istiod{{ if .Values.revision }}-{{ .Values.revision }}{{ end }}.{{ .Values.istioNamespace }}.svc:15012
{{- end }}

{{/* Labels every object of the release carries. */}}
{{- define "ztunnel.labels" -}}
app: ztunnel
app.kubernetes.io/name: ztunnel
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: istio
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}
