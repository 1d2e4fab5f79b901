"""Families kept outside `trainables/` for tests, each GLUE's with one behaviour changed (a crash, no model, a slow
clean-up...). A search space names one by its dotted path, `family: tests.doubles.<module>`; Ray's workers import it
from the project root, which the tests put on PYTHONPATH (`tests.helpers.search_fixtures.ENV`)."""
