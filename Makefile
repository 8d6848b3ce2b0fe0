# make demo : set up (first time) + sample footage -> curated shards -> report -> tiny 3-stage training -> sample
# make test : set up (first time) + the whole test suite (offline, CPU)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
DEMO_FOOTAGE ?= demo_footage
DEMO_OUT ?= demo_out

.PHONY: setup browser test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium for the report's browser test (playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(BIN)/pytest -q

demo: setup
	$(BIN)/curate demo-footage $(DEMO_FOOTAGE)
	$(BIN)/curate run pipeline.yaml --input $(DEMO_FOOTAGE) --output $(DEMO_OUT) --num-cpus 2 --skip-unavailable-models --overwrite
	$(BIN)/curate report $(DEMO_OUT)
	@echo "curated clips: $(DEMO_OUT)/scores (every clip), $(DEMO_OUT)/shards (kept clips), $(DEMO_OUT)/run.json"
	@echo "report: $(DEMO_OUT)/report/index.html"
	# A tiny model through the three stages (image, video, hq) on the demo shards, then a sample.
	# The demo has no aesthetic scores (no CLIP weights here), so hq selects on motion only.
	$(BIN)/curate train $(DEMO_OUT) --stage all --preset-size tiny --threads 1 \
		--set 'hq.select={"motion_score": {"min": 1.5}}'
	$(BIN)/curate sample $(DEMO_OUT)/train/hq --prompt '' --frames 4 --steps 20 --threads 1 \
		--out $(DEMO_OUT)/sample.mp4
	@echo "trained checkpoints: $(DEMO_OUT)/train/{image,video,hq}; sample: $(DEMO_OUT)/sample.mp4 and .gif"

bench: setup
	$(BIN)/python bench/spine_bench.py
	$(BIN)/python bench/report_bench.py
	$(BIN)/python bench/models_bench.py
	$(BIN)/python bench/ocr_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/train_stream_bench.py
	$(BIN)/python bench/cut_bench.py

clean:
	rm -rf $(DEMO_OUT) $(DEMO_FOOTAGE) bench_out .pytest_cache
