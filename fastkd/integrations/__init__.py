"""fastkd inside the distillation frameworks people already use.

Each module imports its framework and is imported by nobody in fastkd (``import fastkd`` stays
free of them); install the framework with the extra of the same name:

- :mod:`fastkd.integrations.trl` (``pip install "fastkd[trl]"``): ``FastKDDistillationTrainer``,
  TRL's ``DistillationTrainer`` with its loss computed by :func:`fastkd.fused_linear_kd_loss`.
- :mod:`fastkd.integrations.trl_server` (the same extra): ``FastKDServerDistillationTrainer``, TRL's
  ``ServerDistillationTrainer`` (a teacher's top-k from a vLLM server) with its top-k forward KL
  computed by :func:`fastkd.fused_linear_sparse_kd_loss`.
- :mod:`fastkd.integrations.torchdistill` (``pip install "fastkd[torchdistill]"``): ``FastKDLoss``,
  torchdistill's ``KDLoss`` computed by :func:`fastkd.kd_loss`, registered in torchdistill's loss
  registry so that a YAML config selects it by name.
"""
