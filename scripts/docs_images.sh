#!/usr/bin/env bash
# Regenerate the docs' walkthrough images and numbers from runs/digits (after scripts/quickstart.sh).
# Writes docs/*.png and prints the numbers docs/ quote; scratch files go to ${WORK:-/tmp/ddim-docs}.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-/tmp/ddim-docs}; rm -rf "$W"; mkdir -p "$W"
ddim() { .venv/bin/ddim "$@" --no-progress; }
enlarge() {  # enlarge SRC DEST FACTOR: nearest-neighbour, so pixels stay visible
  .venv/bin/python -c "
from PIL import Image; import sys
im = Image.open(sys.argv[1]).convert('RGB'); f = int(sys.argv[3])
im.resize((im.width * f, im.height * f), Image.NEAREST).save(sys.argv[2])" "$@"
}
last=$(ls runs/digits/samples/step-*.png | tail -1); enlarge "$last" docs/digits-quickstart.png 3
ddim sample runs/digits --class 3 --n 16 --out "$W/c3.png"; enlarge "$W/c3.png" docs/sample-class3.png 4
ddim sample runs/digits --unconditional --n 16 --out "$W/unc.png"; enlarge "$W/unc.png" docs/sample-unconditional.png 4
.venv/bin/python scripts/export_digits.py --out "$W/digits" 3 17 42 100 > /dev/null
two=("$W/digits/digit3.png" "$W/digits/digit17.png")
ddim invert runs/digits "${two[@]}" --steps 50 --interpolate 8 --out "$W/inv"
enlarge "$W/inv/grid.png" docs/invert-grid.png 4; enlarge "$W/inv/interpolation.png" docs/invert-interpolation.png 4
echo "== inversion MSE of two digits by steps (plain, then --exact)"
for S in 10 20 50; do
  ddim invert runs/digits "${two[@]}" --steps $S --out "$W/inv$S" | grep "mean MSE"
  ddim invert runs/digits "${two[@]}" --steps $S --exact --out "$W/invx$S" | grep -E "mean MSE|exact inversion"
done
echo "== four digits (classes 3, 7, 1, 4), 20 steps, guidance 3: plain / guided / null-text / exact + null-text"
four=("$W/digits/digit3.png" "$W/digits/digit17.png" "$W/digits/digit42.png" "$W/digits/digit100.png")
for args in "" "--class 3,7,1,4" "--class 3,7,1,4 --guidance 3" "--class 3,7,1,4 --guidance 3 --null-text" \
    "--class 3,7,1,4 --guidance 3 --null-text --exact"; do
  echo "-- $args"; ddim invert runs/digits "${four[@]}" --steps 20 $args --out "$W/nt" | grep "mean MSE"
done
echo "== edits: ten real digits to class 8"
.venv/bin/python scripts/export_digits.py --out "$W/ten" 0 1 2 3 4 5 6 7 9 10 > /dev/null
ddim edit runs/digits "$W"/ten/digit{0,1,2,3,4,5,6,7,9,10}.png --to-class 8 --steps 20 --out "$W/edit8" | tail -2
enlarge "$W/edit8/grid.png" docs/edit-grid.png 4
echo "== restoration of eight real digits (--degrade), then the scores on 100 held-out digits"
.venv/bin/python scripts/export_digits.py --out "$W/eight" 3 17 42 100 200 300 400 500 > /dev/null
eight=("$W"/eight/digit{3,17,42,100,200,300,400,500}.png)
for task in "inpaint --mask bottom-half --n-samples 3" "sr --sr 4" "denoise --sigma 0.3" "repaint --mask center --method repaint"; do
  name=${task%% *}; ddim restore runs/digits "${eight[@]}" --degrade ${task#* } --out "$W/$name" | tail -3
  enlarge "$W/$name/grid.png" docs/restore-$name.png 4
done
.venv/bin/python scripts/eval_restore.py runs/digits --n 100 --steps 50
if [ -d runs/colour-digits ]; then  # colourisation needs the RGB model of configs/colour-digits.yaml
  ddim restore runs/colour-digits data/colour-digits/{0003,0017,0042,0100,0200,0300,0400,0500}.png \
    --gray --degrade --n-samples 2 --out "$W/colour" | tail -3
  enlarge "$W/colour/grid.png" docs/restore-colour.png 4
fi
ddim compare runs/digits --steps 10,20,50 --eta 0,1 --n 6 --out "$W/cmp"
cp "$W/cmp/grid.png" docs/compare-grid.png; cp "$W/cmp/time_vs_steps.png" docs/compare-time.png
cat "$W/cmp/table.md"
cp runs/digits/metrics.png docs/metrics.png
