"""What runs the stages: the project's servers, the ``retrain`` flow, its scheduled deployment
and the lock that keeps two retrains apart."""
