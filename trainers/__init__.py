"""Trainer subclasses (distillation, curriculum) land here; see the issue tracker."""
