"""Experiments over seeds: ``compare`` (SP against the baseline), ``study`` (ablations),
``efficiency`` (AP against labelled images), their statistics and reports, and ``kernels``."""
