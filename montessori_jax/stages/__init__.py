"""One command each (synthesize, sft, influence, preferences, dpo, eval, score, generate, serve,
judge, compare, the teacher shift): their files, resume, fingerprints, progress and plots. No
model math: that lives in ``kernels`` and ``core``."""
