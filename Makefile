# make demo: set up .venv and run every stage on the generated demo data into runs/demo/
# make test: set up .venv with the test packages and run the test suite (what CI runs)
PYTHON ?= python3
PY := .venv/bin/python
RUN := runs/demo
FLOWERS := ../shared/data/oxford-flowers12
FRUN := runs/flowers

.PHONY: demo test flowers clean-demo

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
	@echo "demo outputs are in $(RUN)/"

test: .venv/.requirements-test
	$(PY) -m pytest -q tests

flowers: .venv/.requirements
	test -d $(FLOWERS) || { echo "$(FLOWERS) not found: the flower photos live in ../shared"; exit 1; }
	$(PY) train_model.py --DATA_DIR=$(FLOWERS) --RUN_DIR=$(FRUN) --IMAGE_SIZE=128 --EPOCHS=40
	$(PY) mobilenetv3_features.py --RUN_DIR=$(FRUN)
	$(PY) get_model_architecture.py --RUN_DIR=$(FRUN) --IMAGE_SIZE=128

clean-demo:
	rm -rf $(RUN)
