"""Inference: a trained segment model (and its card) localizes events in videos or features.

Pure: results are values (:mod:`.results`); writing them to files is the command line's job.
"""
from .localizer import LocalizeError, Localizer, check_video, class_names_of
from .results import Localization, Span, merge_spans

__all__ = ["Localization", "LocalizeError", "Localizer", "Span", "check_video", "class_names_of", "merge_spans"]
