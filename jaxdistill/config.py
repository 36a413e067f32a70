"""The config schema every run shares; config files under configs/ start from `base_config()`.

Every field exists here with its type, so a command-line override of a misspelled or wrongly
typed field fails at start (ml_collections locks the config) naming the field. Durations are in
steps; EMA half-life and lr warm-up are in images, as in EDM.
"""
from __future__ import annotations

import ml_collections as mlc

from jaxdistill import diffusion


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0
    c.method = mlc.ConfigDict({"name": "edm", "p_mean": -1.2, "p_std": 1.2})
    # Example shape (H, W, C) or (D,), classes (0 = unconditional) and EDM's sigma_data.
    # compute_dtype: float32 / bfloat16 (network compute only; params and optimizer stay fp32).
    c.model = mlc.ConfigDict({"shape": (2,), "label_dim": 0, "sigma_data": diffusion.SIGMA_DATA,
                              "compute_dtype": "float32"})
    c.network = mlc.ConfigDict({"name": "mlp"})  # plus the network's constructor fields
    # (U-Nets also take remat=True: recompute block activations in the backward pass.)
    # The frozen teacher (jaxdistill/teacher.py): kind none / analytic / checkpoint; `checkpoint`
    # is a run directory, `network` the teacher's network fields (the student's are in c.network).
    c.teacher = mlc.ConfigDict({"kind": "none", "checkpoint": "",
                                "network": mlc.ConfigDict({"name": "mlp"})})
    # name: mixture2d / image_mixture / mixture / digits / cifar10 / imagenet64. mixture_file: for
    # name 'mixture', an .npz or .json file with means (K, D) or (K, H, W, C), stds (K,), weights
    # (K,) and optionally classes (K,) (data.mixtures.load_file); "" for every other name.
    c.data = mlc.ConfigDict({"name": "mixture2d", "resolution": 8, "std": 0.08, "num_modes": 8,
                             "radius": 1.0, "mixture_file": "", "data_dir": "", "split": "train",
                             "random_flip": False})
    c.optim = mlc.ConfigDict({"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                              "lr_rampup_images": 10_000_000, "grad_clip": 0.0})
    c.ema = mlc.ConfigDict({"halflife_images": 500_000.0, "rampup_ratio": 0.05})
    c.train = mlc.ConfigDict({"batch_size": 512, "num_steps": 400_000, "log_every": 100,
                              "ckpt_every": 5000, "sample_every": 5000, "keep_checkpoints": 3,
                              "num_grid_samples": 64, "eval_every": 0})
    # sampler: heun / euler / ddim / multistep, or gamma (CTM's gamma-sampling); ema_index picks
    # an evaluation EMA for methods that keep several.
    c.sample = mlc.ConfigDict({"sampler": "heun", "num_steps": 18, "gamma": 0.0, "ema_index": 0,
                               "sigma_min": diffusion.SIGMA_MIN, "sigma_max": diffusion.SIGMA_MAX,
                               "rho": diffusion.RHO, "s_churn": 0.0, "s_min": 0.0,
                               "s_max": float("inf"), "s_noise": 1.0, "eta": 0.0,
                               "guidance_scale": 1.0})
    # best_metric: an eval metric (e.g. 'sliced_wasserstein', 'fid') whose best checkpoint is kept.
    # TFDS image data: inception_weights = pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or
    # its .npz), ref_stats = reference .npz (EDM's fid-refs or run.py --mode=ref_stats, which
    # writes it from ref_num_images images of data.split, 0 = all, keeping pr_num_features
    # features for precision / recall with k = pr_k); feature_batch_size images per Inception
    # batch (split over the mesh).
    c.eval = mlc.ConfigDict({"num_samples": 2048, "batch_size": 512, "best_metric": "",
                             "best_mode": "min", "inception_weights": "", "ref_stats": "",
                             "feature_batch_size": 200, "ref_num_images": 0,
                             "pr_num_features": 10_000, "pr_k": 3})
    # Device mesh (data, fsdp); -1 = all remaining devices. Arrays smaller than min_shard_size
    # elements stay replicated.
    c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "min_shard_size": 2**14})
    return c
