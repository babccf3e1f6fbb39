{{/* Names and labels. */}}
{{- define "distill-detector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "distill-detector.fullname" -}}
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

{{- define "distill-detector.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "distill-detector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distill-detector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "distill-detector.labels" -}}
helm.sh/chart: {{ include "distill-detector.chart" . }}
{{ include "distill-detector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distill-detector
{{- end }}

{{- define "distill-detector.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "distill-detector.secretName" -}}
{{- default (printf "%s-secrets" (include "distill-detector.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{/*
One value of `env:` as the settings parse it: lists joined with commas (tuple settings), whole numbers
without an exponent (YAML numbers reach templates as float64, and 2000000 would print as 2e+06), null as "".
*/}}
{{- define "distill-detector.envValue" -}}
{{- if kindIs "slice" . }}{{ join "," . }}
{{- else if kindIs "invalid" . }}
{{- else if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/*
The container environment, generated from `env:` so that it names exactly the settings' variables:
env.<section>.<field> -> DETECTOR_<SECTION>__<FIELD>, env.<field> -> DETECTOR_<FIELD>; then the two secret
settings, from the Secret. Called with (dict "root" $ "skip" (list NAME...)): the variables named in `skip`
are left out, for a workload that sets them itself (the rate limiter's own Kafka identity).
*/}}
{{- define "distill-detector.env" -}}
{{- $root := .root }}
{{- $skip := .skip | default list }}
{{- range $key, $value := $root.Values.env }}
{{- if kindIs "map" $value }}
{{- range $field, $v := $value }}
{{- $name := printf "DETECTOR_%s__%s" (upper $key) (upper $field) }}
{{- if not (has $name $skip) }}
- name: {{ $name }}
  value: {{ include "distill-detector.envValue" $v | quote }}
{{- end }}
{{- end }}
{{- else if not (has (printf "DETECTOR_%s" (upper $key)) $skip) }}
- name: {{ printf "DETECTOR_%s" (upper $key) }}
  value: {{ include "distill-detector.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- $secret := include "distill-detector.secretName" $root }}
{{- $secrets := $root.Values.secrets }}
{{- if and (or $secrets.existingSecret $secrets.kafkaSaslPassword) (not (has "DETECTOR_KAFKA__SASL_PASSWORD" $skip)) }}
- name: DETECTOR_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: kafka-sasl-password
      optional: {{ not $secrets.kafkaSaslPassword }}
{{- end }}
{{- if or $secrets.existingSecret $secrets.fingerprintKey }}
- name: DETECTOR_FINGERPRINT_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: fingerprint-key
{{- end }}
{{- end }}

{{/*
The rate limiter's own Kafka identity (rateLimiter.kafka, secrets.rateLimiterKafkaSaslPassword): the names
of the variables it replaces, as a JSON list (empty: the rate limiter shares the workers' identity). Any
non-empty field replaces its DETECTOR_KAFKA__<FIELD>; once any is set, the workers' SASL password is never
given to the rate limiter, and with its own sasl_username it gets its own password from the Secret.
*/}}
{{- define "distill-detector.ratelimitKafkaOverrides" -}}
{{- $own := .Values.rateLimiter.kafka | default dict }}
{{- $names := list }}
{{- range $field, $value := $own }}
{{- if not (has $field (list "sasl_username" "ssl_certfile" "ssl_keyfile")) }}
{{- fail (printf "rateLimiter.kafka.%s: only sasl_username, ssl_certfile and ssl_keyfile can differ from env.kafka" $field) }}
{{- end }}
{{- if $value }}
{{- $names = append $names (printf "DETECTOR_KAFKA__%s" (upper $field)) }}
{{- end }}
{{- end }}
{{- if and .Values.secrets.rateLimiterKafkaSaslPassword (not $own.sasl_username) }}
{{- fail "secrets.rateLimiterKafkaSaslPassword is set but rateLimiter.kafka.sasl_username is not" }}
{{- end }}
{{- if $names }}
{{- $names = append $names "DETECTOR_KAFKA__SASL_PASSWORD" }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* Pod-level pieces shared by the worker and the rate limiter. */}}
{{- define "distill-detector.podAnnotations" -}}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
