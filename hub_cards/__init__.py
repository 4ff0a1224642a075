"""Model-card templates and the code that fills them land here; see the issue tracker."""
