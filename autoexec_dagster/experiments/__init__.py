"""Experiments: variants of an action tested against a control and the holdout, and the outcomes they are judged by."""
