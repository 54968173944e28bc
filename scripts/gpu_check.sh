#!/usr/bin/env bash
# The prepared GPU check (issue 34): about 8 minutes on one H100/H200-class GPU.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine; writes $OUT (default gpu-check/)
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh # the same steps with tiny settings, to try it on a CPU
#   GPU_CHECK_PYTHON=python3 bash scripts/gpu_check.sh  # no package registry: that Python's torch
#
# Without GPU_CHECK_PYTHON it sets up .venv (scripts/setup.sh). With it, it runs the package from
# this checkout with that interpreter, after installing any wheels in .whl/ into /tmp/site (a GPU
# machine with no registry: carry diffusers and its needs there, as the device tool's notes say).
#
# Runs the quickstart, every command once on it (each small command twice with --compile, to time
# a fresh build against one loaded from the compile cache), fp32 against bf16 samples scored by
# scripts/eval_digits.py, scripts/bench.py (ours against diffusers in fp32 and at its best) and
# the cifar10 config's own training loop on synthetic images, then prints one table: each row's
# wall time and what it measured. Logs of every step are kept under $OUT/logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
TINY=${GPU_CHECK_TINY:-0}
mkdir -p "$OUT/logs"
export DDIM_CACHE_DIR="$OUT/cache"  # a fresh compile cache: the first build of each shape is timed cold
TABLE="$OUT/gpu_check.md"
: >"$TABLE.rows"

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/logs/setup.log" 2>&1 || { echo "wheel install failed: $OUT/logs/setup.log"; exit 1; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  fi
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  DDIM="$PY -m ddim_cli"
else
  bash scripts/setup.sh >"$OUT/logs/setup.log" 2>&1 || { echo "setup failed: $OUT/logs/setup.log"; exit 1; }
  PY=.venv/bin/python
  DDIM=.venv/bin/ddim
fi

if [ "$TINY" = 1 ]; then
  QUICK=(--set train.steps=20 --set train.checkpoint_every=20 --set train.sample_every=0)
  N_EVAL=20; BENCH=(--models small --batch 2 --train-batch 2 --steps 2 --repeats 1)
  BENCH_BIG=(--models small --train-batch 4 --steps 2 --repeats 1); LOOP_STEPS=6; LOOP_BATCH=4
  DISTILL=(--set distill.round_steps=4 --set train.batch_size=8); SYNTHETIC=16; LOOP_COMPILE=false
  BENCH+=(--diffusers-best); BENCH_BIG+=(--no-diffusers-best)
else
  QUICK=(); N_EVAL=500; BENCH=(--models cifar10 --batch 256 --train-batch 128 --steps 50 --repeats 5)
  BENCH_BIG=(--models cifar10 --train-batch 512 --steps 50 --repeats 5); LOOP_STEPS=400; LOOP_BATCH=128
  DISTILL=(); SYNTHETIC=1024; LOOP_COMPILE=true
fi

# step NAME COMMAND...: run it, log it, time it; the table row gets the wall time and exit status.
step() {
  local name=$1; shift
  local start status tenths
  start=$(date +%s%N)
  "$@" >"$OUT/logs/$name.log" 2>&1
  status=$?
  tenths=$((($(date +%s%N) - start) / 100000000))
  printf '%s\t%d.%d\t%s\n' "$name" $((tenths / 10)) $((tenths % 10)) "$status" >>"$TABLE.rows"
  echo "$name: exit $status, $((tenths / 10)).$((tenths % 10)) s" >&2
}

$PY - >"$OUT/device.txt" <<'EOF'
import platform, torch
from ddim_cli.acceleration import describe_device
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda = torch.version.cuda or "none"
print(f"device: {describe_device(device)}; torch {torch.__version__}; CUDA {cuda}; python {platform.python_version()}")
EOF

RUN="$OUT/digits"
step quickstart $DDIM train configs/digits.yaml --run-dir "$RUN" --no-progress "${QUICK[@]}"
mkdir -p "$OUT/inputs"
$PY scripts/export_digits.py --out "$OUT/inputs" 3 17 >/dev/null 2>&1
# The small jobs of issue 34's table, as a user runs them (auto: eager on their size), 500 samples
# in bf16 and fp32 to score, and a small job compiled twice: cold, then from the cache.
step sample-class $DDIM sample "$RUN" --class 3 --n 16 --steps 20 --out "$OUT/class3.png" --no-progress
step sample-dpm $DDIM sample "$RUN" --n 16 --steps 8 --sampler dpm++2m --out "$OUT/dpm.png" --no-progress
step sample-500 $DDIM sample "$RUN" --n "$N_EVAL" --precision bf16 --npz "$OUT/bf16.npz" --out "$OUT/bf16.png" --no-progress
step sample-500-fp32 $DDIM sample "$RUN" --n "$N_EVAL" --precision fp32 --npz "$OUT/fp32.npz" --out "$OUT/fp32.png" --no-progress
step invert-exact $DDIM invert "$RUN" "$OUT"/inputs/*.png --steps 10 --exact --out "$OUT/invert" --no-progress
step edit $DDIM edit "$RUN" "$OUT"/inputs/*.png --to-class 8 --out "$OUT/edit" --no-progress
step restore $DDIM restore "$RUN" "$OUT"/inputs/*.png --degrade --sr 4 --out "$OUT/restore" --no-progress
step compare $DDIM compare "$RUN" --steps 10,20 --eta 0,1 --n 6 --out "$OUT/compare" --no-progress
step export $DDIM export "$RUN" --out "$OUT/export"
step distill $DDIM distill "$RUN" --method consistency --steps 4 --run-dir "$OUT/student" --no-progress "${DISTILL[@]}"
step compiled-cold $DDIM sample "$RUN" --class 3 --n 16 --steps 20 --compile --out "$OUT/c1.png" --no-progress
step compiled-cached $DDIM sample "$RUN" --class 3 --n 16 --steps 20 --compile --out "$OUT/c2.png" --no-progress
step eval-bf16 "$PY" scripts/eval_digits.py "$OUT/bf16.npz" --json "$OUT/scores.jsonl"
step eval-fp32 "$PY" scripts/eval_digits.py "$OUT/fp32.npz" --json "$OUT/scores.jsonl"

# bench.py: ours against diffusers fp32 eager and diffusers at its best (bf16, NHWC, compiled).
step bench "$PY" scripts/bench.py "${BENCH[@]}" --json "$OUT/bench.json"
step bench-big-batch "$PY" scripts/bench.py "${BENCH_BIG[@]}" --no-sampling --json "$OUT/bench-big.json"

# The cifar10 config's own loop (data on the device, EMA, logging, checkpoints) on random images,
# compiled as a full run would be, to compare its images/s with bench.py's bare step.
$PY - "$OUT/synthetic" "$SYNTHETIC" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, count = Path(sys.argv[1]), int(sys.argv[2])
root.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(count):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:05d}.png")
EOF
step cifar10-loop $DDIM train configs/cifar10.yaml --run-dir "$OUT/cifar10-loop" --no-progress \
  --set data.dataset=folder --set data.root="$OUT/synthetic" --set train.steps=$LOOP_STEPS \
  --set train.batch_size=$LOOP_BATCH --set train.compile=$LOOP_COMPILE --set train.log_every=50 \
  --set train.checkpoint_every=$LOOP_STEPS --set train.sample_every=0

$PY - "$OUT" "$TABLE" <<'EOF'
import json, re, sys
from pathlib import Path
out, table = Path(sys.argv[1]), Path(sys.argv[2])
rows = [line.split("\t") for line in Path(f"{table}.rows").read_text().splitlines()]
def log(name):
    path = out / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""
def found(name, pattern):
    match = re.search(pattern, log(name))
    return match.group(1) if match else "?"
notes = {
    "quickstart": "images/s " + found("quickstart", r"(\d+) images/s"),
    "compiled-cold": "build " + found("compiled-cold", r"built in ([\d.]+) s"),
    "compiled-cached": "build " + found("compiled-cached", r"built in ([\d.]+) s") + " (from the cache)",
    "invert-exact": found("invert-exact", r"exact inversion: ([\d.]+ model calls per step)"),
}
scores = {}
if (out / "scores.jsonl").exists():
    for line in (out / "scores.jsonl").read_text().splitlines():
        s = json.loads(line)
        if s["samples"] != "real held-out":
            scores[Path(s["source"]).stem] = s
for name in ("bf16", "fp32"):
    if name in scores:
        s = scores[name]
        notes[f"eval-{name}"] = f"confident {s['confident']:.3f}, PCA-FD {s['pca_fd']:.1f}"
if {"bf16", "fp32"} <= scores.keys():  # the quality gate's tolerances: 0.03 confident, 1.35x PCA-FD
    b, f = scores["bf16"], scores["fp32"]
    ok = abs(b["confident"] - f["confident"]) <= 0.03 and max(b["pca_fd"], f["pca_fd"]) <= 1.35 * min(b["pca_fd"], f["pca_fd"])
    notes["eval-fp32"] += f"; bf16 {'within' if ok else 'OUTSIDE'} the gate's tolerances of fp32"
bench_step = None
for name in ("bench", "bench-big-batch"):
    path = out / ("bench.json" if name == "bench" else "bench-big.json")
    if path.exists():
        r = json.loads(path.read_text())
        parts = []
        for s in r["sampling"]:
            parts.append(f"sampling {s['batch']}x{s['steps']} {s['ours_s']:.3f} s vs diffusers {s['diffusers_s']:.3f}"
                         + (f" / best {s['diffusers_best_s']:.3f}" if s.get("diffusers_best_s") else ""))
        for t in r["training"]:
            bench_step = bench_step or t["ours_images_per_s"]
            peak = f", {t['of_peak_pct']:.1f}% of bf16 peak" if t.get("of_peak_pct") else ""
            best = t.get("diffusers_best_images_per_s")
            parts.append(f"training b{t['batch']} {t['ours_images_per_s']:.0f} img/s{peak} vs diffusers "
                         f"{t['diffusers_images_per_s']:.0f}" + (f" / best {best:.0f}" if best else ""))
        notes[name] = "; ".join(parts)
metrics = out / "cifar10-loop" / "metrics.jsonl"
if metrics.exists():
    speeds = [json.loads(l).get("images_per_s") for l in metrics.read_text().splitlines()]
    speeds = [s for s in speeds if s]
    if speeds:
        steady = speeds[-1]
        notes["cifar10-loop"] = f"{steady:.0f} img/s in the last window" + (
            f" = {steady / bench_step:.2f} of bench's step" if bench_step else "")
lines = [(out / "device.txt").read_text().strip(), "", "| check | wall s | exit | measured |", "|---|---|---|---|"]
def how(name):  # whether a ddim command compiled: each build prints one "torch.compile:" line
    if name.startswith(("bench", "eval")):
        return ""
    return ("compiled" if "torch.compile:" in log(name) else "eager") + "; "
lines += [f"| {name} | {seconds} | {status} | {how(name)}{notes.get(name, '')} |" for name, seconds, status in rows]
table.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
