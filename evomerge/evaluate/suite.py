"""Task suites, as the evaluation layer sees them: the format is :mod:`evomerge.suites` (a lower layer,
so the calibration data of data-aware merges reads suites too); these are its names."""

from evomerge.suites import (EXTRACT_RULES, KINDS, MAX_LINE_PROBLEMS, PRIMARY, SPLITS, DataFiles, Extract, ExtractSpec,
                             GenerateTask, Item, LoglikTask, MultipleChoiceTask, Suite, SuiteFile, Task, extract_answer,
                             load_suite, normalize_answer, parse_suite)

__all__ = ["EXTRACT_RULES", "KINDS", "MAX_LINE_PROBLEMS", "PRIMARY", "SPLITS", "DataFiles", "Extract", "ExtractSpec",
           "GenerateTask", "Item", "LoglikTask", "MultipleChoiceTask", "Suite", "SuiteFile", "Task", "extract_answer",
           "load_suite", "normalize_answer", "parse_suite"]
