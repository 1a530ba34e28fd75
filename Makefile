# Set-up and the two README commands. Every target installs into .venv first (idempotent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# compat/ is installed from requirements.txt: a change to its sources reinstalls it (pip always reinstalls a local path).
# The project itself is installed editable (`pip install -e .`: the clone on sys.path, the gkl-* commands in
# $(BIN)); a change to its packaging (pyproject.toml, hatch_build.py) reinstalls it.
COMPAT_SRC := $(sort $(wildcard compat/pyproject.toml compat/*.pth compat/gkl_at_compat/*.py))
PACKAGING := pyproject.toml hatch_build.py
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt $(COMPAT_SRC) $(PACKAGING) | cksum | cut -d' ' -f1)
QS := runs/quickstart

.PHONY: install quickstart test bench clean-venv

$(STAMP): requirements.txt requirements-dev.txt $(COMPAT_SRC) $(PACKAGING)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	@# torchattacks (a dev dependency until issue 27) ships its own robustbench/ over robustbench's files: in a venv
	@# made before, remove it and restore robustbench's own files (uninstalling it deletes the files both claim)
	if $(BIN)/python -m pip show -q torchattacks 2>/dev/null; then $(BIN)/python -m pip uninstall -q -y torchattacks \
	  && $(BIN)/python -m pip install -q --no-deps --force-reinstall "$$(grep '^robustbench' requirements.txt)"; fi
	$(BIN)/python -m pip install -q -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Train GKL-AT on the embedded digits, train the same net without attack as the baseline,
# and evaluate both with clean, PGD-20 and AutoAttack accuracy.
quickstart: install
	$(BIN)/python train_at.py --preset quickstart --out $(QS)/gkl --overwrite --no-progress
	$(BIN)/python train_at.py --preset quickstart --loss ce --out $(QS)/ce --overwrite --no-progress
	$(BIN)/python eval_autoattack.py $(QS)/ce --attacks clean pgd20 aa --eps 16/255 --n-ex 200 --quiet
	$(BIN)/python eval_autoattack.py $(QS)/gkl --attacks clean pgd20 aa --eps 16/255 --n-ex 200 --quiet
	$(BIN)/python -m evaluation.compare $(QS)/ce $(QS)/gkl

test: install
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench: install
	for f in bench/[a-z]*.py; do m=$$(basename $$f .py); echo "== python -m bench.$$m"; $(BIN)/python -m bench.$$m || exit 1; done

clean-venv:
	rm -rf $(VENV)
