# The README's two commands for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
STAMP   := $(VENV)/.imgrec-installed
FMNIST  := /usr/share/datasets/fashion-mnist
RUN     ?= runs/demo

.PHONY: setup data chromium photos demo test test-fast bench fuzz clean docs

setup: $(STAMP)

# torch/torchvision are pinned in constraints.txt; pip takes them from the local wheel cache here.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[serve,report,export,stream,timm,tensorboard,dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package when it is missing and apt is available;
# elsewhere imgrec downloads it with torchvision's downloader on first use.
data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not install dataset-fashion-mnist with apt; imgrec will try to download it"; \
	fi

# Debian's chromium for the browser tests (playwright is pointed at /usr/bin/chromium and downloads nothing),
# as .ci/run installs it; without apt, or if the install fails, the browser tests are skipped.
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1)) || \
	  echo "note: could not install chromium with apt; the browser tests will be skipped"; \
	fi

# Debian's mate-backgrounds and lomiri-wallpapers-16.04: real photos the transfer tests cut their small folders
# from (tests/photofolder.py)
PHOTO_PKGS := mate-backgrounds lomiri-wallpapers-16.04
photos:
	@if { [ ! -d /usr/share/backgrounds/mate/nature ] || [ ! -f /usr/share/backgrounds/Wine_by_Jakkub_Mede.jpg ]; } \
	    && command -v apt-get >/dev/null 2>&1; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PHOTO_PKGS) >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PHOTO_PKGS) >/dev/null 2>&1)) || \
	  echo "note: could not install $(PHOTO_PKGS) with apt; the photo tests will fail"; \
	fi

demo: setup data
	$(BIN)/imgrec train --data fashion-mnist --out $(RUN) --overwrite
	$(BIN)/imgrec eval --model $(RUN) --data fashion-mnist --split test
	$(BIN)/imgrec export-samples --data fashion-mnist --split test --count 4 --out $(RUN)/samples
	$(BIN)/imgrec predict --model $(RUN) $(RUN)/samples --top-k 3

test: setup data chromium photos
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -x --timeout=900

# Everything but the tests marked slow (real training runs, torchrun, subprocess servers, browsers, audits):
# about 2 minutes on 2 cores, for running often while changing code. `make test` still runs everything.
test-fast: setup data photos
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -x --timeout=900 -m "not slow"

# The long fuzzing run of the image decoder (tests/fuzz_decode.py), bounded by FUZZ_RUNS inputs; the corpus
# folder starts from tests/imagefactory.py's images and keeps what libFuzzer finds. A finding is saved as
# crash-<sha1> (reproduce: $(BIN)/python tests/fuzz_decode.py crash-<sha1>).
FUZZ_RUNS   ?= 2000000
FUZZ_CORPUS ?= fuzz-corpus
fuzz: setup
	mkdir -p $(FUZZ_CORPUS)
	$(BIN)/python tests/fuzz_decode.py -atheris_runs=$(FUZZ_RUNS) -timeout=20 $(FUZZ_CORPUS)/

bench: setup data
	$(BIN)/python benchmarks/time_to_accuracy.py
	$(BIN)/python benchmarks/throughput.py

# The guided tour: docs/make_tour.py trains a small model and writes docs/tour.md and docs/tour/*.png from that run.
docs: setup data
	$(BIN)/python docs/make_tour.py --out docs

clean:
	rm -rf $(VENV) runs .pytest_cache $(FUZZ_CORPUS)
