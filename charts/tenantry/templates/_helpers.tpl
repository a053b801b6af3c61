{{/*
Names, labels and shared pieces of every template.
*/}}

{{/* "<release>-api", "<release>-operator": release names are at most 53 characters. */}}
{{- define "tenantry.apiName" -}}
{{- printf "%s-api" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tenantry.portalName" -}}
{{- printf "%s-portal" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tenantry.operatorName" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Cluster-scoped names carry the namespace too, so two releases never collide. */}}
{{- define "tenantry.clusterName" -}}
{{- printf "%s-%s-%s" .ctx.Release.Name .ctx.Release.Namespace .component -}}
{{- end -}}

{{- define "tenantry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select every pod of this release. */}}
{{- define "tenantry.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels that select the pods of one component; call with (dict "ctx" . "component" "api"). */}}
{{- define "tenantry.componentSelectorLabels" -}}
{{ include "tenantry.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels of every object; call with (dict "ctx" . "component" "api"). */}}
{{- define "tenantry.labels" -}}
{{ include "tenantry.componentSelectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tenantry
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "tenantry.chart" .ctx }}
{{- end -}}

{{/* Image reference; call with (dict "ctx" . "repository" REPO "tag" TAG). */}}
{{- define "tenantry.image" -}}
{{- $tag := .tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end -}}


{{/*
Values the schema already requires; repeated here so that rendering without the schema
(e.g. --skip-schema-validation) still fails with a clear message.
*/}}
{{- define "tenantry.validate" -}}
{{- $_ := required "api.database.urlSecret.name is required: the Secret holding the PostgreSQL URL" .Values.api.database.urlSecret.name -}}
{{- $_ := required "api.keys.secretName is required: the Secret holding master.key and token-signing.key" .Values.api.keys.secretName -}}
{{- if .Values.api.tls.enabled -}}
{{- $_ := required "api.tls.secretName is required when api.tls.enabled is true" .Values.api.tls.secretName -}}
{{- end -}}
{{- if and .Values.api.backup.enabled (not .Values.api.backup.recipients) -}}
{{- fail "api.backup.recipients is required when api.backup.enabled is true: the age recipients (backup.pub of tenantry-api backup-keygen) backups are encrypted to" -}}
{{- end -}}
{{- if .Values.portal.enabled -}}
{{- $_ := required "portal.cookieKey.secretName is required when portal.enabled is true: the Secret holding cookie.key" .Values.portal.cookieKey.secretName -}}
{{- end -}}
{{- end -}}

{{/* Egress rules every control plane pod needs: cluster DNS and the Kubernetes API server. */}}
{{- define "tenantry.commonEgress" -}}
{{- $np := .Values.networkPolicy -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ $np.dns.namespace }}
      podSelector:
        matchLabels:
          {{- toYaml $np.dns.podLabel | nindent 10 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
- ports:
    {{- range $np.kubeApiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $np.kubeApiServer.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . | quote }}
    {{- end }}
  {{- end }}
{{- end -}}
