"""The five ``dvc.yaml`` stages, one module each, named as the stage and its params section:
prepare -> validate -> train -> evaluate -> register. Each has a pure ``run(...)``, a thin
Prefect flow and a ``main()`` (``python -m pipelines <stage>``)."""
