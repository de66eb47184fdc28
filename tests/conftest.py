"""Shared pytest configuration: one hypothesis profile for the whole suite."""

from hypothesis import settings

# Exactness examples run real forward/backward passes: no per-example deadline,
# and a number of examples that keeps the suite within its time budget.
settings.register_profile("truebatch", deadline=None, max_examples=30)
settings.load_profile("truebatch")
