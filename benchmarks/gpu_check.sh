#!/usr/bin/env bash
# The GPU figures (kernels' verdict, training on CUDA, the LoRA step against PEFT) in one device call.
#
#   bash benchmarks/gpu_check.sh prepare     # here, once per session: fills .gpu/ (ignored by git)
#   bash benchmarks/gpu_check.sh run         # on the device machine, carrying .gpu; about 6 minutes
#   bash benchmarks/gpu_check.sh run --cpu   # here: every step on the CPU at toy sizes, to check the script
#
# The device machine has torch, triton, lightning, transformers, peft and torchmetrics but reaches no registry
# and takes at most 64 MiB of files. So `prepare` puts into .gpu/ (about 5 MiB) what it lacks: plan's own wheel,
# the pure-Python wheels of jsonargparse and its signature extras, and the embedded MiniLM's and SmolLM2's
# configs and tokenizers without their weights. The runs use random weights of the same shapes (`backbone_config`) and
# the synthetic text source; accuracies there say that training runs on CUDA, not how good a model is.
#
# Results land in $OUT (here without a device: /tmp/gpu_check): env.json, kernels.json, lora_step_minilm.json,
# lora_step_smollm.json and log (everything printed). Each step has its own time limit, so one that hangs
# leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
WHEELS=(jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0)

prepare() {
    rm -rf "$GPU" && mkdir -p "$GPU/whl"
    python -m pip wheel -q --no-deps --no-build-isolation -w "$GPU/whl" . || exit 1
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform any -d "$GPU/whl" "${WHEELS[@]}" || exit 1
    python - "$GPU" <<'EOF' || exit 1
"""The embedded models' configs (model_type plus the fields that shape them) and tokenizers, no weights."""
import json, sys
from pathlib import Path
from transformers import AutoConfig
from plan.models import EMBEDDED_MINILM, EMBEDDED_SMOLLM, load_tokenizer, resolve_model_path

for name, source in {"minilm": EMBEDDED_MINILM, "smollm": EMBEDDED_SMOLLM}.items():
    folder = Path(sys.argv[1]) / name
    load_tokenizer(source).save_pretrained(folder)
    config = AutoConfig.from_pretrained(resolve_model_path(source)).to_diff_dict()
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(key, None)
    (folder / "backbone_config.json").write_text(json.dumps(config, indent=1))
EOF
    du -sh "$GPU"
}

run() {
    local cpu=${1:-}
    export OUT=${OUT:-/tmp/gpu_check} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    mkdir -p "$OUT"
    exec > >(tee "$OUT/log") 2>&1
    [ -d "$GPU/whl" ] || { echo "no $GPU/whl: run 'bash benchmarks/gpu_check.sh prepare' here and carry $GPU"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
        "$GPU"/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_site
    local accelerator=gpu precision=bf16-mixed device=cuda per_class=60 kernels=() step=(--trials 16)
    if [ "$cpu" = --cpu ]; then
        accelerator=cpu precision=32-true device=cpu per_class=4 kernels=(--smoke)
        step=(--trials 2 --warmup 1 --seq-len 32 --no-memory)
        export TRITON_INTERPRET=1
    else
        kernels=(--hidden 768 4096 --ranks 16 64 --tokens 16384 --dropout 0.0 0.1 --compile-mode default)
    fi
    python3 - "$OUT/env.json" <<'EOF'
import json, platform, subprocess, sys
import lightning, peft, torch, transformers, triton
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if torch.cuda.is_available() else None
env = {"gpu": smi, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
       "lightning": lightning.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
       "python": platform.python_version()}
print(env)
json.dump(env, open(sys.argv[1], "w"), indent=1)
EOF

    echo "== 1. kernels: fused Triton against eager and torch.compile; errors against fp32"
    timeout 240 python3 benchmarks/kernel_speed.py "${kernels[@]}" --json "$OUT/kernels.json"

    # The quickstart's shapes (MiniLM, LoRA rank 8 on query/value) with random weights on synthetic text;
    # kernel auto takes the Triton path on CUDA.
    local model=(--model.init_args.backbone_config "$(cat $GPU/minilm/backbone_config.json)"
        --model.init_args.lora.kernel auto --data.init_args.tokenizer "$GPU/minilm"
        --data.init_args.source.class_path plan.datamodules.SyntheticSource
        --data.init_args.source.init_args.num_classes 20
        --data.init_args.source.init_args.train_per_class "$per_class"
        --data.init_args.source.init_args.test_per_class "$per_class"
        --trainer.accelerator "$accelerator" --trainer.precision "$precision" --trainer.logger false
        --trainer.enable_progress_bar false)
    rm -rf /tmp/gpu_check_runs
    echo "== 2a. continual run (configs/quickstart.yaml's shape) on $accelerator, $precision"
    timeout 120 python3 -m plan.cli fit --config configs/quickstart.yaml "${model[@]}" \
        --trainer.default_root_dir /tmp/gpu_check_runs/continual
    echo "== 2b. federated run (configs/federated/fedit.yaml's shape) on $accelerator, $precision"
    timeout 120 python3 -m plan.cli fit --config configs/federated/fedit.yaml "${model[@]}" \
        --trainer.default_root_dir /tmp/gpu_check_runs/federated

    echo "== 3. LoRA training step, plan against PEFT, random weights of the embedded models' shapes"
    timeout 150 python3 benchmarks/lora_step.py --device "$device" "${step[@]}" --json \
        --config "$GPU/minilm/backbone_config.json" > "$OUT/lora_step_minilm.json"
    timeout 180 python3 benchmarks/lora_step.py --device "$device" "${step[@]}" --json --model smollm \
        --batch 8 --config "$GPU/smollm/backbone_config.json" > "$OUT/lora_step_smollm.json"
    echo "== done"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run "${2:-}" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare | run [--cpu]"; exit 2 ;;
esac
