# osp.c build. `make` builds ./osp; `make test` runs the test suite; `make run` trains and samples;
# `make ablation` reproduces the paper's ablation (about 50 minutes on 2 cores).
# `make reproduce` trains adam and osp longer on a prose corpus (`make corpus`).
CC ?= cc
CFLAGS ?= -O3 -std=c11 -Wall -Wextra
# Strict -std=c11 turns off fusing a*b+c into one FMA instruction; the kernels need it.
# The fused result is rounded once, and the same code runs on every thread, so results stay
# deterministic.
FP = -ffp-contract=fast
LDLIBS = -lm

# -march=native where the compiler accepts it.
NATIVE := $(shell echo 'int main(void){return 0;}' | $(CC) -march=native -x c - -o /dev/null 2>/dev/null && echo -march=native)
# OpenMP when available; NO_OMP=1 builds without it (omp simd pragmas still vectorize).
ifeq ($(NO_OMP),1)
  OMP := -fopenmp-simd
else
  OMP := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
  ifeq ($(OMP),)
    OMP := -fopenmp-simd
  endif
endif

CORPUS_URL = https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
CORPUS_SHA = 86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
SHARED_CORPUS = ../shared/data/tinyshakespeare.txt

.PHONY: all test test-run data run ablation ablation-long corpus reproduce clean

all: osp

osp: osp.c Makefile
	$(CC) $(CFLAGS) $(FP) $(NATIVE) $(OMP) -o $@ osp.c $(LDLIBS)

test_osp: test_osp.c osp.c Makefile
	$(CC) $(CFLAGS) $(FP) $(NATIVE) $(OMP) -o $@ test_osp.c $(LDLIBS)

# Sanitizer build: no OpenMP (its runtime is not instrumented); runs the quick subset.
# The full suite retrains tokenizer.bin from the corpus to check it is reproducible.
test_osp_asan: test_osp.c osp.c Makefile
	$(CC) -O1 -g -std=c11 -Wall -Wextra -fsanitize=address,undefined -fno-sanitize-recover=all -fopenmp-simd $(FP) -o $@ test_osp.c $(LDLIBS)

test: osp test_osp test_osp_asan data/tinyshakespeare.txt
	./test_osp
	./test_osp_asan --quick

# The export checks on make run's checkpoints (run make run first).
test-run: test_osp
	./test_osp --export adam.ckpt osp.ckpt

data/tinyshakespeare.txt:
	@mkdir -p data
	@if [ -f $(SHARED_CORPUS) ]; then cp $(SHARED_CORPUS) $@.tmp; \
	else echo "downloading $(CORPUS_URL)"; \
	  (curl -fsSL $(CORPUS_URL) -o $@.tmp || wget -q -O $@.tmp $(CORPUS_URL)) || { rm -f $@.tmp; echo "error: download failed"; exit 1; }; fi
	@echo "$(CORPUS_SHA)  $@.tmp" | sha256sum -c --quiet - || { rm -f $@.tmp; echo "error: sha256 mismatch for tinyshakespeare"; exit 1; }
	@mv $@.tmp $@

data/train.bin data/val.bin &: data/tinyshakespeare.txt tokenizer.bin osp
	./osp prepare --input data/tinyshakespeare.txt --tokenizer tokenizer.bin --train data/train.bin --val data/val.bin

data: data/train.bin data/val.bin

# The Adam baseline and the OSP recipe on the same data and token budget, side by side.
run: osp data
	./osp train --preset adam --out adam.ckpt
	./osp train --preset osp --out osp.ckpt
	./osp compare adam.ckpt osp.ckpt
	./osp sample adam.ckpt --prompt "ROMEO:" --tokens 100
	./osp sample osp.ckpt --prompt "ROMEO:" --tokens 100

# The six presets x 2 seeds, evaluated, tabulated beside the paper, kurtosis curves plotted.
# Interrupted? Run it again: finished runs are kept, the unfinished one resumes.
ablation: osp data
	./osp ablation --dir runs/ablation

# The same for 4x the tokens (8.2M per run): about 3.5 hours on 2 cores; resumable like ablation.
ablation-long: osp data
	./osp ablation --dir runs/ablation-long --steps 4000 --kurtosis-every 200

# A corpus that does not repeat: English prose from Debian's and npm's packages, cleaned, held out
# by whole documents and sha256-checked (data/corpus.sh; data/README.md has the sources and
# licences), with a tokenizer trained on it.
CORPUS = data/corpus
corpus: $(CORPUS)/train.bin $(CORPUS)/val.bin

$(CORPUS)/train.txt $(CORPUS)/val.txt &:
	sh data/corpus.sh

# The corpus's files do not go stale when osp is rebuilt (| osp): retraining the tokenizer takes minutes.
$(CORPUS)/tokenizer.bin: $(CORPUS)/train.txt | osp
	./osp tokenizer --input $(CORPUS)/train.txt --vocab 1024 --out $@

$(CORPUS)/train.bin $(CORPUS)/val.bin &: $(CORPUS)/train.txt $(CORPUS)/val.txt $(CORPUS)/tokenizer.bin | osp
	./osp prepare --input $(CORPUS)/train.txt --val-input $(CORPUS)/val.txt --tokenizer $(CORPUS)/tokenizer.bin \
	  --train $(CORPUS)/train.bin --val $(CORPUS)/val.bin

# The paper's 4-bit result on a longer run: adam and osp, one seed, 13.3M tokens of the prose
# corpus each (1.2 passes), on a model as large as make run's but 16 layers of width 64, context
# 512 (README, "a longer run"). About 2 hours on 2 cores; resumable like the ablation.
REPRODUCE = --dim 64 --layers 16 --heads 4 --ffn-dim 256 --seq-len 512 --batch 4 --steps 6500 \
  --kurtosis-every 250 --eval-windows 256
reproduce: osp corpus
	./osp ablation --dir runs/reproduce --presets adam,osp --seeds 1 $(REPRODUCE) \
	  --train $(CORPUS)/train.bin --val $(CORPUS)/val.bin --tokenizer $(CORPUS)/tokenizer.bin

clean:
	rm -f osp test_osp test_osp_asan *.tmp
