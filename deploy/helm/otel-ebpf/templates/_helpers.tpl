{{- define "otel-ebpf.labels" -}}
app.kubernetes.io/name: otel-ebpf
app.kubernetes.io/part-of: otel-ebpf
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "otel-ebpf.selector" -}}
app.kubernetes.io/name: otel-ebpf
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}
{{- define "otel-ebpf.config" -}}
{{- if .Values.config }}{{ .Values.config }}{{ else }}{{ .Files.Get "files/otel-ebpf.yaml" }}{{ end -}}
{{- end -}}
