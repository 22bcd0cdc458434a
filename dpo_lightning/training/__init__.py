"""The training machinery every stage shares, below the stages and above the models.

- `checkpoint`: atomic checkpoint files and folders, hard links; `integrity`: is a checkpoint whole;
  `resume`: the state an exact resume needs besides weights (RNG streams, metric windows);
- `callbacks`: when checkpoints are written (and validation, on optimizer-step boundaries); `preemption`: the
  signal watch and `Preempted`; `guards`: the non-finite guard; `progress`: the optimizer-step progress bar
  (all four importable from `callbacks`);
- `distributed`: FSDP2 sharding of the models a stage holds, sharded-checkpoint consolidation;
- `metrics`: TRL-named running means, exact across ranks;
- `optim`: the default warmup + decay schedule, optimizer settings as data;
- `runs`: run folders (``version_N``) and ``--ckpt_path last``;
- `folders`: output folders of ``generate`` and ``iterate`` (locks, settings records).
"""
