#!/usr/bin/env bash
# Every GPU check of the project in one go, on a machine with a CUDA GPU (the gpu test tier, then the
# GPU benchmarks), each step under its own time limit, all within 10 minutes; logs, results and
# summary.md go to $OUT.
#   bash bench/gpu_check.sh                       # OUT defaults to gpu_out/
# On an offline GPU machine, pack here first (the shared packer, plus the test runner's wheels):
#   bash ../shared/gpu/pack.sh && python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl \
#       pytest==9.2.0 pytest-xdist==3.8.0 pytest-timeout==2.4.0 execnet pluggy iniconfig packaging
# then there:  source .gpu/setup.sh && bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT/results"
summary="$OUT/summary.md"
{ echo "# GPU checks, $(date -u +%F)"; echo; $PY -c "import torch; print('-', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
  echo; echo "| step | exit | seconds |"; echo "|---|---|---|"; } > "$summary"

step() {  # step NAME SECONDS COMMAND...: one check, its log in $OUT/NAME.log, its line in the summary
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "| $name | $? | $((SECONDS - start)) |" >> "$summary"
}

# the tier in 4 processes (each test is its own command line: most of its time is imports); the quick
# benchmarks are left to the real ones below
step test-gpu 240 $PY -m pytest -m gpu -q -rs -p no:cacheprovider -n 4 --durations=20 -k "not bench_quick"
step finetune-roberta-base 90 $PY -m bench.run finetune --device cuda --shape roberta_base --out "$OUT/results"
step finetune-llama-1b 150 $PY -m bench.run finetune --device cuda --shape llama_1b --out "$OUT/results"
step scale 100 $PY -m bench.run scale --device cuda --out "$OUT/results"
for f in "$OUT"/results/*.json; do
  [ -f "$f" ] && $PY -c "import json,sys; from bench.run import format_record; print(format_record(json.load(open(sys.argv[1]))))" "$f" >> "$summary"
done
tail -n 3 "$OUT/test-gpu.log" >> "$summary"
cat "$summary"
