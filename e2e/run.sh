#!/usr/bin/env bash
# End-to-end test on a kind cluster: build the image, install the chart, serve
# SmolLM2 from a ModelDeployment, call it through the router with the openai SDK,
# turn tenants on (a Tenant's key, its limit, a Tenant without its Secret), then
# scale, change the spec and delete. Needs docker, kind, helm, kubectl and
# python3; reaches no network beyond PyPI (for the model and the test packages).
# Everything it creates is removed on exit (KANDLE_E2E_KEEP=1 keeps the cluster).
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="${KANDLE_E2E_CLUSTER:-kandle-e2e}"
image="kandle:e2e"
model_image="kandle-smollm2:e2e"
system_ns="kandle-system"
app_ns="models"
key="sk-e2e-$RANDOM$RANDOM"
router_key="sk-e2e-router-$RANDOM$RANDOM"
tenant_key="sk-e2e-tenant-$RANDOM$RANDOM"
work="$(mktemp -d)"
forward_pid=""

log() { printf '\n== %s\n' "$*"; }

cleanup() {
  local status=$?
  if [[ -n "$forward_pid" ]]; then kill "$forward_pid" 2>/dev/null || true; fi
  if [[ $status -ne 0 ]]; then
    log "failed; cluster state"
    kubectl get md,deploy,svc,pdb,pods -A 2>/dev/null || true
    kubectl -n "$system_ns" logs deploy/kandle-controller --tail=50 2>/dev/null || true
  fi
  if [[ "${KANDLE_E2E_KEEP:-}" != "1" ]]; then kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

for tool in docker kind helm kubectl python3; do
  command -v "$tool" >/dev/null || { echo "e2e needs $tool on PATH" >&2; exit 2; }
done
python3 -m pip install --quiet -r tests/requirements.txt

log "cluster $cluster"
kind create cluster --name "$cluster" --wait 120s

log "images"
docker build -t "$image" .
# The model travels as an image layer: nothing in the cluster reaches the internet.
cp "$(scripts/fetch-smollm2.sh)" "$work/model.gguf"
printf 'FROM %s\nCOPY --chown=65532:65532 model.gguf /models/SmolLM2-135M-Instruct.Q4_1.gguf\n' "$image" > "$work/Dockerfile"
docker build -t "$model_image" "$work"
kind load docker-image "$image" "$model_image" --name "$cluster"

log "helm install"
helm install kandle charts/kandle --namespace "$system_ns" --create-namespace \
  --set image.repository=kandle --set image.tag=e2e --set image.pullPolicy=Never \
  --set controller.replicas=2 --set router.replicas=1 --wait --timeout 180s

log "ModelDeployment"
kubectl create namespace "$app_ns"
# The router's own key is a worker key too, for when tenants are on.
kubectl -n "$app_ns" create secret generic llm-keys --from-literal=e2e="$key" --from-literal=router="$router_key"
kubectl -n "$app_ns" apply -f - <<YAML
apiVersion: kandle.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: smollm2
spec:
  model: smollm2
  aliases: [gpt-4o-mini]
  image: $model_image
  source:
    url: file:///models/SmolLM2-135M-Instruct.Q4_1.gguf
  replicas: 1
  auth:
    apiKeySecretRef: {name: llm-keys}
YAML
kubectl -n "$app_ns" wait md/smollm2 --for=condition=Ready --timeout=300s
kubectl -n "$app_ns" get md smollm2

log "openai SDK through the router"
kubectl -n "$system_ns" port-forward svc/kandle-router 18080:80 >/dev/null &
forward_pid=$!
for _ in $(seq 60); do
  curl -fsS http://127.0.0.1:18080/ready >/dev/null 2>&1 && break
  sleep 1
done
KANDLE_E2E_BASE_URL=http://127.0.0.1:18080 KANDLE_E2E_KEY="$key" python3 -m pytest e2e/test_cluster.py -q

log "tenants"
kill "$forward_pid" 2>/dev/null || true
forward_pid=""
kubectl -n "$system_ns" create secret generic router-key --from-literal=key="$router_key"
helm upgrade kandle charts/kandle --namespace "$system_ns" --reuse-values \
  --set tenants.enabled=true --set router.upstreamKeySecret.name=router-key --wait --timeout 180s
kubectl -n "$app_ns" create secret generic team-keys --from-literal=k="$tenant_key"
kubectl -n "$app_ns" apply -f - <<YAML
apiVersion: kandle.dev/v1alpha1
kind: Tenant
metadata: {name: team}
spec:
  keySecretRef: {name: team-keys}
  requestsPerMinute: 2
  models: [gpt-4o-mini]
---
apiVersion: kandle.dev/v1alpha1
kind: Tenant
metadata: {name: orphan}
spec:
  keySecretRef: {name: no-such-secret}
  models: ["*"]
YAML
kubectl -n "$app_ns" wait tenant/team --for=condition=Ready --timeout=120s
kubectl -n "$app_ns" wait tenant/orphan --for=jsonpath='{.status.conditions[0].reason}'=SecretMissing --timeout=120s
kubectl -n "$app_ns" get tenants
kubectl -n "$system_ns" rollout status deploy/kandle-router --timeout=180s
kubectl -n "$system_ns" port-forward svc/kandle-router 18080:80 >/dev/null &
forward_pid=$!
chat() { # chat KEY: the HTTP status of a one-token request for gpt-4o-mini through the router
  curl -s -o "$work/answer.json" -D "$work/headers.txt" -w '%{http_code}' http://127.0.0.1:18080/v1/chat/completions \
    -H "Authorization: Bearer $1" -H 'Content-Type: application/json' \
    -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}' || true
}
# The kubelet brings the compiled Secret into the router pod within about a minute.
status=""
for _ in $(seq 120); do
  status="$(chat "$tenant_key")"
  [[ "$status" == 200 ]] && break
  sleep 1
done
[[ "$status" == 200 ]] || { echo "the tenant's key never worked: $status $(cat "$work/answer.json")" >&2; exit 1; }
grep -qi '^x-ratelimit-limit-requests: 2' "$work/headers.txt"
[[ "$(chat "$key")" == 401 ]] || { echo "a worker key is no tenant key" >&2; exit 1; }
status="$(chat "$tenant_key")"
[[ "$status" == 200 || "$status" == 429 ]] || { echo "second request: $status" >&2; exit 1; }
status="$(chat "$tenant_key")"
[[ "$status" == 429 ]] || { echo "past 2 requests a minute: $status" >&2; exit 1; }
grep -q rate_limit_exceeded "$work/answer.json"

log "scale to 2"
kubectl -n "$app_ns" scale md/smollm2 --replicas 2
kubectl -n "$app_ns" wait md/smollm2 --for=jsonpath='{.status.readyReplicas}'=2 --timeout=300s
kubectl -n "$app_ns" get pdb smollm2

log "spec change rolls the workers"
kubectl -n "$app_ns" patch md smollm2 --type merge -p '{"spec":{"engine":{"maxBatchSize":4}}}'
kubectl -n "$app_ns" rollout status deploy/smollm2 --timeout=300s
kubectl -n "$app_ns" get deploy smollm2 -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q '"--max-batch-size","4"'
kubectl -n "$app_ns" wait md/smollm2 --for=condition=Ready --timeout=300s

log "delete: owned objects go with it"
kubectl -n "$app_ns" delete md smollm2 --wait --timeout=120s
for _ in $(seq 60); do
  left="$(kubectl -n "$app_ns" get deploy,svc,pdb -l app.kubernetes.io/instance=smollm2 -o name)"
  [[ -z "$left" ]] && break
  sleep 2
done
[[ -z "$left" ]] || { echo "still there: $left" >&2; exit 1; }

log "e2e passed"
