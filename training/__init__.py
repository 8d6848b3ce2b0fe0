"""The built-in three-stage SVD-style trainer on curated shards (DESIGN.md section 4).

diffusion.py  EDM preconditioning (v-prediction scalings), loss, noise levels, Heun sampler, guidance
unet.py       the space-time U-Net (spatial blocks + zero-initialised temporal blocks, image mode)
data.py       shard rows -> training samples: mp4 decoding, frame sampling, the hq predicate
stream.py     the data stream: shard row groups in seeded, resumable order, bounded memory
latents.py    latent mode: the autoencoder's latents of every row group, cached as parquet
config.py     TrainConfig, the image/video/hq presets, key=value overrides
loop.py       the training loop of one stage: EMA, checkpoints, exact resume, metrics
checkpoint.py the checkpoint files: listed, loaded, the newest that loads, written durably
ray_train.py  the same loop on Ray Train workers (DDP)
sample.py     sampling a checkpoint to mp4 + GIF
cli.py        `curate train` and `curate sample`
synthetic.py  small synthetic shards for tests, the bench and smoke runs
study/        `curate ablate`: proxy models on curated / uncurated / ablated subsets, held-out loss,
              and the study's page (study/report.py)
"""
