{{/* Names, labels, and the decisions that several templates share. */}}

{{- define "joulegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "joulegate.fullname" -}}
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

{{- define "joulegate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "joulegate.labels" -}}
helm.sh/chart: {{ include "joulegate.chart" . }}
app.kubernetes.io/name: {{ include "joulegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: joulegate
{{- end }}

{{/* Selector labels of one component: include with (list $ "proxy"). */}}
{{- define "joulegate.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "joulegate.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "joulegate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "joulegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "joulegate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "joulegate.redisName" -}}
{{- printf "%s-redis" (include "joulegate.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "joulegate.agentName" -}}
{{- printf "%s-agent" (include "joulegate.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* The chart's own Secret, holding secrets.env, backends[].apiKey and redis.auth.password. */}}
{{- define "joulegate.agentTokenSecret" -}}
{{- .Values.agent.token.existingSecret | default (printf "%s-token" (include "joulegate.agentName" .)) }}
{{- end }}

{{- define "joulegate.secretName" -}}
{{- include "joulegate.fullname" . }}
{{- end }}

{{- define "joulegate.redisAuthFromChart" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) }}true{{ end }}
{{- end }}

{{- define "joulegate.hasChartSecret" -}}
{{- $has := or (not (empty .Values.secrets.env)) (include "joulegate.redisAuthFromChart" .) -}}
{{- range .Values.backends }}{{ if .apiKey }}{{ $has = true }}{{ end }}{{ end -}}
{{- if $has }}true{{ end }}
{{- end }}

{{/* How many proxy processes may run at once: replicas (or the HPA's max) times workers. */}}
{{- define "joulegate.processes" -}}
{{- $pods := int .Values.replicaCount -}}
{{- if .Values.autoscaling.enabled }}{{ $pods = int .Values.autoscaling.maxReplicas }}{{ end -}}
{{- mul $pods (int .Values.workers) -}}
{{- end }}

{{/* "true" when the ledger is shared by every proxy process (a Redis). */}}
{{- define "joulegate.sharedLedger" -}}
{{- if or .Values.redis.enabled .Values.ledger.urlSecretRef.name (hasPrefix "redis://" .Values.ledger.url) (hasPrefix "rediss://" .Values.ledger.url) }}true{{ end }}
{{- end }}

{{- define "joulegate.sqliteLedger" -}}
{{- if and (not .Values.redis.enabled) (not .Values.ledger.url) (not .Values.ledger.urlSecretRef.name) }}true{{ end }}
{{- end }}

{{/* The config's `ledger:` value. */}}
{{- define "joulegate.ledgerUrl" -}}
{{- if .Values.redis.enabled -}}
{{- $auth := "" -}}
{{- if .Values.redis.auth.enabled }}{{ $auth = ":${JOULEGATE_REDIS_PASSWORD}@" }}{{ end -}}
{{- printf "redis://%s%s:6379/%d" $auth (include "joulegate.redisName" .) (int .Values.redis.db) -}}
{{- else if .Values.ledger.urlSecretRef.name -}}
${JOULEGATE_LEDGER_URL}
{{- else if .Values.ledger.url -}}
{{- .Values.ledger.url -}}
{{- else -}}
{{- printf "sqlite://%s" .Values.ledger.sqlitePath -}}
{{- end -}}
{{- end }}

{{/* Every combination the chart refuses, with the way out; included by the Deployment. */}}
{{- define "joulegate.validate" -}}
{{- if empty .Values.backends }}
{{- fail "\n\nbackends is empty: JouleGate needs at least one OpenAI-compatible backend, e.g.\n  --set backends[0].url=http://vllm:8000/v1" }}
{{- end }}
{{- range $key := list "backends" "ledger" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "\n\nconfig.%s: set it with the top-level `%s:` value, not under config (the chart renders it)" $key $key) }}
{{- end }}
{{- end }}
{{- if and .Values.config.server (or (hasKey .Values.config.server "host") (hasKey .Values.config.server "port")) }}
{{- fail "\n\nconfig.server.host/port: the chart listens on 0.0.0.0:<containerPort>; set containerPort instead" }}
{{- end }}
{{- if and .Values.metricsPort (eq (int .Values.metricsPort) (int .Values.containerPort)) }}
{{- fail "\n\nmetricsPort: must differ from containerPort (0 serves /metrics on containerPort)" }}
{{- end }}
{{- range $i, $b := .Values.backends }}
{{- if and $b.apiKey $b.apiKeySecretRef }}
{{- fail (printf "\n\nbackends[%d]: set apiKey or apiKeySecretRef, not both" $i) }}
{{- end }}
{{- if and (or $b.apiKey $b.apiKeySecretRef) (hasKey $b "api_key") }}
{{- fail (printf "\n\nbackends[%d]: api_key and apiKey/apiKeySecretRef both given; keep one" $i) }}
{{- end }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.ledger.url .Values.ledger.urlSecretRef.name) }}
{{- fail "\n\nledger: redis.enabled deploys a Redis for the ledger, and ledger.url/urlSecretRef names another store; choose one (redis.enabled=false for an external one)" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled (not .Values.redis.auth.password) (not .Values.redis.auth.existingSecret) }}
{{- fail "\n\nredis.auth.enabled: set redis.auth.password or redis.auth.existingSecret" }}
{{- end }}
{{- if and (gt (int (include "joulegate.processes" .)) 1) (not (include "joulegate.sharedLedger" .)) }}
{{- fail (printf "\n\nmore than one proxy process (replicaCount=%v, autoscaling.enabled=%v, workers=%v) needs a shared ledger: each pod would keep its own ledger, budgets and in-flight weights, so budgets multiply and energy is attributed twice. Set redis.enabled=true, or ledger.url=redis://HOST:6379/0, or replicaCount=1 and workers=1." .Values.replicaCount .Values.autoscaling.enabled .Values.workers) }}
{{- end }}
{{- if and .Values.ledger.persistence.enabled (not (include "joulegate.sqliteLedger" .)) }}
{{- fail "\n\nledger.persistence is for the SQLite ledger; with Redis use redis.persistence" }}
{{- end }}
{{- end }}

{{/* The proxy's config file. Sections in the contract's order; values already validated. */}}
{{- define "joulegate.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $server := deepCopy ($cfg.server | default dict) -}}
{{- $_ := set $server "host" "0.0.0.0" -}}
{{- $_ := set $server "port" (int .Values.containerPort) -}}
{{- if .Values.metricsPort }}{{ $_ := set $server "metrics_port" (int .Values.metricsPort) }}{{ end -}}
{{- $backends := list -}}
{{- range $i, $b := .Values.backends -}}
{{- $out := omit $b "apiKey" "apiKeySecretRef" -}}
{{- if not $out.name }}{{ $_ := set $out "name" (printf "backend-%d" $i) }}{{ end -}}
{{- if or $b.apiKey $b.apiKeySecretRef }}{{ $_ := set $out "api_key" (printf "${JOULEGATE_BACKEND_%d_API_KEY}" $i) }}{{ end -}}
{{- if and $.Values.agent.enabled (eq (dig "power" "source" "" $b) "agent") (not (dig "power" "token_file" "" $b)) (not (dig "power" "token_env" "" $b)) -}}
{{- $_ := set $out "power" (merge (dict "token_env" "JOULEGATE_AGENT_TOKEN") (deepCopy $b.power)) -}}
{{- end -}}
{{- $backends = append $backends $out -}}
{{- end -}}
# Rendered by the joulegate Helm chart from its values; `joulegate check-config` validates it.
# Environment references (dollar-brace NAME) are the pod's env: the chart's Secret, secrets.*, extraEnv.
{{ toYaml (dict "server" $server) }}
{{ toYaml (dict "backends" $backends) }}
{{- range $section := list "routing" "energy" "tenants" "admin_api_keys_sha256" "anonymous_tenant" "metrics" }}
{{- if hasKey $cfg $section }}
{{ toYaml (dict $section (get $cfg $section)) }}
{{- end }}
{{- end }}
{{- range $section, $value := omit $cfg "server" "routing" "energy" "tenants" "admin_api_keys_sha256" "anonymous_tenant" "metrics" }}
{{ toYaml (dict $section $value) }}
{{- end }}
ledger: {{ include "joulegate.ledgerUrl" . | quote }}
{{- end }}
