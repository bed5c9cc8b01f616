#!/usr/bin/env bash
# Run the Fireworks cookbook's own DPO recipe, unchanged, against preftune's emulator.
#
# What it installs: a separate virtualenv ($VENV, default /work/venv-cookbook, made with
# --system-site-packages so the CPU torch already installed is reused and no CUDA torch is
# downloaded) holding the cookbook's training/ package as its README installs it
# (`pip install --pre -e training`), then the two pins of its uv.lock that matter to the SDK:
# fireworks-ai[training]==1.2.9 and tinker==0.23.0. (With the newest fireworks-ai that the
# pyproject's ">=1.2.9,<2" resolves to, 1.2.30, the recipe fails on the client before any request:
# the renderer builds tinker.ModelInput, which fireworks-ai >= 1.2.25 rejects.) Nothing is
# installed into the Python that runs the emulator. No model or data is downloaded: the base
# model is preftune's builtin:tiny and the data are 16 of preftune's demo pairs.
#
# What it runs: `python -m preftune.testing.emulator` on 127.0.0.1:$PORT with
# accounts/fireworks/models/qwen3-8b mapped to builtin:tiny, then the cookbook's
# training/recipes/dpo_loop.py (its `main(Config(...))`, the code as it is; only the Config is
# ours: the tiny tokenizer saved to a directory, renderer qwen3, batch 4, one render worker,
# output_model_id set) on the data in both of the cookbook's DPO formats ({chosen, rejected}
# messages and OpenAI's {input, preferred_output, non_preferred_output}), full-parameter and
# LoRA. The SDKs' defaults stay on (telemetry included). For each run it prints the exit code,
# the wall time, the final save + promote time, tracebacks, "Timed out" waits, and whether the
# emulator then lists the promoted model; at the end, what the clients left behind.
#
# Usage (not run by the test suite or CI; about 2 minutes on 2 cores):
#   PREFTUNE_PYTHON=/work/venv-cook/bin/python bench/cookbook_dpo_loop.sh
# Settings (environment): COOKBOOK_GIT (a clone or bare mirror of fw-ai/cookbook, default
# /work/.mirror/fw-ai+cookbook/repo), COOKBOOK_REV (default HEAD), VENV, PORT (default 18765),
# WORK (scratch directory, default a new temporary one), PREFTUNE_PYTHON (a Python that imports
# preftune, default python).
set -euo pipefail

COOKBOOK_GIT=${COOKBOOK_GIT:-/work/.mirror/fw-ai+cookbook/repo}
COOKBOOK_REV=${COOKBOOK_REV:-HEAD}
VENV=${VENV:-/work/venv-cookbook}
PORT=${PORT:-18765}
WORK=${WORK:-$(mktemp -d -t cookbook-dpo-XXXX)}
PREFTUNE_PYTHON=${PREFTUNE_PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
export FIREWORKS_API_KEY=fw-emulator-key FIREWORKS_BASE_URL=http://127.0.0.1:$PORT
unset TINKER_TELEMETRY FIREWORKS_TRAINER_GATEWAY_URL TINKER_BASE_URL

echo "work directory: $WORK; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p "$WORK/cookbook"
git -C "$COOKBOOK_GIT" archive "$COOKBOOK_REV" training | tar -x -C "$WORK/cookbook"  # (a mirror may lack
# blobs outside training/: git names them and still exits 0)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c "import training.recipes.dpo_loop" 2>/dev/null; then
  "$VENV/bin/pip" install -q --pre -e "$WORK/cookbook/training"
fi
"$VENV/bin/pip" install -q "fireworks-ai[training]==1.2.9" "tinker==0.23.0"

# The tiny tokenizer, saved to a directory the cookbook's load_tokenizer reads; the data in both formats.
"$PREFTUNE_PYTHON" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
from preftune.tiny import demo_data, tiny_tokenizer
work = Path(sys.argv[1])
tiny_tokenizer().save_pretrained(work / "tokenizer")
rows = [json.loads(line) for line in demo_data("train").read_text().splitlines()[:16]]
(work / "chosen_rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
openai = [{"input": {"messages": r["chosen"]["messages"][:-1]},
           "preferred_output": r["chosen"]["messages"][-1:],
           "non_preferred_output": r["rejected"]["messages"][-1:]} for r in rows]
(work / "openai.jsonl").write_text("".join(json.dumps(r) + "\n" for r in openai))
EOF

cat > "$WORK/driver.py" <<'EOF'
"""dpo_loop.main(Config(...)): the recipe's code as it is, with a Config for the emulator."""
import logging, sys, time
import training.recipes.dpo_loop as dpo_loop

dataset, log_path, output_model_id, tokenizer, lora_rank = sys.argv[1:6]
marks = {}

class Marks(logging.Handler):
    """Times of the final save's start and of the promote's answer; counts of timed-out waits."""
    def emit(self, record):
        text = record.getMessage()
        if text.startswith("Saving DCP checkpoint"):
            marks.setdefault("save", time.monotonic())
        if text.startswith("Promoted!"):
            marks["promoted"] = time.monotonic()
        if text.startswith("Timed out"):
            marks["timeouts"] = marks.get("timeouts", 0) + 1

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
logging.getLogger().addHandler(Marks())
config = dpo_loop.Config(log_path=log_path, base_model="accounts/fireworks/models/qwen3-8b", dataset=dataset,
                         tokenizer_model=tokenizer, renderer_name="qwen3", batch_size=4,
                         lora_rank=int(lora_rank), output_model_id=output_model_id, render_workers=1)
start = time.monotonic()
result = dpo_loop.main(config)
save = marks["promoted"] - marks["save"] if "promoted" in marks else float("nan")
print(f"RESULT {dpo_loop.__file__}: main {time.monotonic() - start:.1f} s, final save + promote {save:.1f} s, "
      f"timed-out waits {marks.get('timeouts', 0)}, {result}", flush=True)
EOF

"$PREFTUNE_PYTHON" -m preftune.testing.emulator --port "$PORT" --root "$WORK/emulator" \
  --model accounts/fireworks/models/qwen3-8b=builtin:tiny > "$WORK/emulator.log" 2>&1 &
EMULATOR=$!
trap 'kill -INT $EMULATOR 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "preftune emulator on" "$WORK/emulator.log" && break; sleep 0.2; done

for run in "chosen_rejected 0" "openai 0" "chosen_rejected 8"; do
  set -- $run
  model="cookbook-dpo-${1//_/-}-r$2"
  start=$(date +%s.%N)
  rc=0
  (cd "$WORK/cookbook" && PYTHONPATH="$WORK/cookbook" "$VENV/bin/python" "$WORK/driver.py" "$WORK/$1.jsonl" "$WORK/logs-$model" \
     "$model" "$WORK/tokenizer" "$2") > "$WORK/$model.log" 2>&1 || rc=$?
  wall=$(echo "$(date +%s.%N) - $start" | bc)
  listed=$(curl -s "$FIREWORKS_BASE_URL/v1/accounts/emulated/models?pageSize=200" | grep -c "models/$model\"" || true)
  echo "== $1, lora_rank $2: exit $rc, wall ${wall} s, tracebacks $(grep -c Traceback "$WORK/$model.log" || true)," \
       "listed by the emulator: $listed, load $(cut -d' ' -f1 /proc/loadavg)"
  grep -E "^RESULT|Promoted!" "$WORK/$model.log" | sed 's/^/   /' || true
done

kill -INT $EMULATOR; wait $EMULATOR || true
trap - EXIT
tail -1 "$WORK/emulator.log"
