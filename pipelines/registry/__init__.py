"""The model registry's rules: aliases and rollback, the champion's re-evaluation, the decision."""
