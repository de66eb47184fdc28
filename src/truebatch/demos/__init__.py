"""The demos behind ``truebatch demo`` and ``truebatch bench``.

Everything here runs on data that ships with the installed packages
(scikit-learn's bundled 8x8 digits, the Zen of Python from the standard
library's ``this`` module); nothing is downloaded.

- :mod:`truebatch.demos.data`: the embedded data sets and their fixed splits.
- :mod:`truebatch.demos.models`: a small CNN (BatchNorm, dropout) and a tiny
  character-level causal transformer language model.
- :mod:`truebatch.demos.tasks`: model, losses, data and metric of each demo.
- :mod:`truebatch.demos.loops`: one epoch of each training loop compared: the
  true big batch, the hand-written accumulation loops of the classic failures,
  a correct hand-written loop, and truebatch's.
- :mod:`truebatch.demos.failures`: the names of the five classic failures.
- :mod:`truebatch.demos.methods`: those loops over all of a task's epochs.
- :mod:`truebatch.demos.frameworks`: HF Accelerate's and Lightning's
  accumulation, as their users write it (optional dependencies).
- :mod:`truebatch.demos.runs`: deterministic runs that record loss and
  parameter divergence per optimizer step, and the gradient of each step.
- :mod:`truebatch.demos.demo` / :mod:`truebatch.demos.bench`: the commands;
  :mod:`truebatch.demos.console`: their tables and argument types.
- :mod:`truebatch.demos.plot`: the PNG of loss curves and divergence.
"""
