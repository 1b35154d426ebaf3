#!/usr/bin/env bash
# The quality study (docs/study/llm/quality.md), one heavy job at a time: the defaults' size and layout with
# its calibration variants, FLAP's official code at every size and layout, then the remaining settings
# (python docs/study/llm/quality.py --list shows the order). Each result is appended as it is measured;
# a rerun skips what is there.
# Needs FLAP's code: git clone https://github.com/CASIA-LMC-Lab/FLAP /tmp/FLAP (commit 3bb57db was read).
set -euo pipefail
FLAP=${FLAP:-/tmp/FLAP}
python docs/study/llm/quality.py --only none '*/uniform/s1'
[ -s docs/study/llm/quality/flap_official.jsonl ] || PYTHONPATH=$FLAP python docs/study/llm/flap_official.py
python docs/study/llm/quality.py
