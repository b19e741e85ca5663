"""Settings for the whole test session, applied before any test module imports torch."""

import os

# The CPU tests allocate and free (tokens x 50,304-vocabulary) logits of 200+ MB in every step. glibc maps each
# one afresh and the kernel zero-fills it 4 KiB page by page: half of a tiny CPU run's time was system time.
# PyTorch's THP_MEM_ALLOC_ENABLE backs large CPU tensors with 2 MiB pages instead (measured: a tiny-preset step
# 1.55 s -> 1.32 s, system time halved). The trainer processes that tests start inherit it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# One intra-op thread per process. On 2 cores the tests' gloo pairs and trainer subprocesses already fill both, and
# PyTorch's default (a thread per core, spinning while it waits) then fights them and anything else on the machine:
# measured on a machine at load 9, test_no_recompiles_and_no_host_syncs_after_warmup took 620 s with 2 threads and
# 184 s with 1 (its user time 208 s -> 54 s). Set before any test imports torch; the subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A test that hangs fails with its traceback after 20 minutes (pytest-timeout, in requirements-dev.txt) and the
# suite goes on, instead of holding CI until its own limit with no trace of where it stopped.
os.environ.setdefault("PYTEST_TIMEOUT", "1200")
