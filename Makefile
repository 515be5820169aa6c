# make demo:    set up .venv and run all seven stages on the generated demo data into runs/demo/
# make test:    set up .venv with the test packages and run the test suite (what CI runs)
# make flowers: train the flower baseline once (runs/flowers/baseline.pt) and run the stages on the real photos
# make compare / modes / perf / scaling: the benchmarks (RESULTS.md); compare and modes need make flowers,
#   perf needs make demo
# make transfer: broad (8 species) to narrow (4 held-out species) transfer: dead channels and criteria (~20 CPU min)
PYTHON ?= python3
PY := .venv/bin/python
RUN := runs/demo
FLOWERS := ../shared/data/oxford-flowers12
FRUN := runs/flowers
FARGS := --DATA_DIR=$(FLOWERS) --RUN_DIR=$(FRUN) --IMAGE_SIZE=128

.PHONY: demo test flowers compare modes perf scaling transfer clean-demo

.venv/.requirements: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

.venv/.requirements-test: .venv/.requirements requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

demo: .venv/.requirements
	$(PY) train_model.py --RUN_DIR=$(RUN)
	$(PY) mobilenetv3_features.py --RUN_DIR=$(RUN)
	$(PY) get_model_architecture.py --RUN_DIR=$(RUN)
	$(PY) visualize_neuron_activations.py --RUN_DIR=$(RUN)
	$(PY) visualize_channel_activation.py --RUN_DIR=$(RUN)
	$(PY) experiment_activation_based_block_pruning.py --RUN_DIR=$(RUN)
	$(PY) validate_model_structure.py --RUN_DIR=$(RUN)
	$(PY) get_model_architecture.py --RUN_DIR=$(RUN) --COMPARE=$(RUN)/pruned.pt --OUT=$(RUN)/architecture_pruned.json
	$(PY) visualize_activation_overlay_image.py --RUN_DIR=$(RUN)
	@echo "demo outputs are in $(RUN)/ (pruning_report.json, validation.json, overlays/, activations/, deadness/)"

test: .venv/.requirements-test
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

flowers: .venv/.requirements
	test -d $(FLOWERS) || { echo "$(FLOWERS) not found: the flower photos live in ../shared"; exit 1; }
	$(PY) train_model.py $(FARGS) --EPOCHS=24
	$(PY) mobilenetv3_features.py --RUN_DIR=$(FRUN)
	$(PY) get_model_architecture.py --RUN_DIR=$(FRUN) --IMAGE_SIZE=128
	$(PY) visualize_neuron_activations.py $(FARGS) --SAMPLES_PER_CLASS=60
	$(PY) visualize_channel_activation.py $(FARGS) --SAMPLES_PER_CLASS=60
	$(PY) experiment_activation_based_block_pruning.py $(FARGS) --REFIT_SAMPLES_PER_CLASS=20
	$(PY) validate_model_structure.py $(FARGS)
	$(PY) visualize_activation_overlay_image.py $(FARGS)

compare: .venv/.requirements
	$(PY) -m benchmarks.compare_criteria --DATA_DIR=$(FLOWERS) --RUN_DIR=$(FRUN)

modes: .venv/.requirements
	$(PY) -m benchmarks.prune_modes --DATA_DIR=$(FLOWERS) --RUN_DIR=$(FRUN)

perf: .venv/.requirements
	$(PY) -m benchmarks.perf

scaling: .venv/.requirements
	$(PY) -m benchmarks.scaling

transfer: .venv/.requirements
	test -d $(FLOWERS) || { echo "$(FLOWERS) not found: the flower photos live in ../shared"; exit 1; }
	$(PY) -m benchmarks.transfer --DATA_DIR=$(FLOWERS) --RUN_DIR=runs/transfer

clean-demo:
	rm -rf $(RUN)
