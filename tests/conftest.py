"""Settings for the whole test session, applied before any test module imports torch."""

import os

# The CPU tests allocate and free (tokens x 50,304-vocabulary) logits of 200+ MB in every step. glibc maps each
# one afresh and the kernel zero-fills it 4 KiB page by page: half of a tiny CPU run's time was system time.
# PyTorch's THP_MEM_ALLOC_ENABLE backs large CPU tensors with 2 MiB pages instead (measured: a tiny-preset step
# 1.55 s -> 1.32 s, system time halved). The trainer processes that tests start inherit it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
