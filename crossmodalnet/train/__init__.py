"""Training: losses (Dice + CE, adaptive balancing), patch sampling, the trainer, checkpoints, DDP.

    from crossmodalnet.train.trainer import train
    train("data/phantoms", "runs/cmn", TrainConfig())

See docs/training.md for the run folder, resume and `torchrun` use.
"""
