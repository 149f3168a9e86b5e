#!/usr/bin/env bash
# The main job, offline: inspect the data, plan, fine-tune SmolLM2-135M-Instruct on earnings-call QA,
# compare it with the base model, few-shot prompting and retrieval (RAG), print the table and where the
# report is. Extra args are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CFG=configs/quickstart.yaml
step() {  # step NAME CMD...: run, and remember how long it took
  local name=$1; shift
  local t0=$SECONDS
  echo; echo "== $name: $*"
  "$@"
  TIMES+=("$name $((SECONDS - t0))s")
}
TIMES=()
step inspect tunesmith data inspect "$CFG" "$@"
step plan    tunesmith plan "$CFG" "$@"
# train.precision=auto in the config: bf16 autocast where bf16 matmuls are native, fp32 elsewhere (every command
# resolves it the same way, so `plan` above predicts the precision `train` uses).
step train   tunesmith train "$CFG" "$@"
step compare tunesmith compare "$CFG" "$@"
OUT=$(tunesmith config get "$CFG" out_dir "$@")
echo
echo "== time per step: ${TIMES[*]}"
echo "report:        $OUT/eval/report.html"
echo "chat with it:  tunesmith chat $CFG model.name=$OUT/final"
echo "ship it:       tunesmith export $OUT --gguf --quant q8_0   (GGUF + Ollama Modelfile in $OUT/export)"
echo "your own data: tunesmith train $CFG data.path=my_data.jsonl out_dir=runs/mine   (then: tunesmith compare ...)"
