"""DMD2's method fields with the official ImageNet-64 defaults (tianweiy/DMD2 main/edm/train_edm.py,
edm_guidance.py, experiments/imagenet/*.sh; shared/research/ctm_dmd2_msd.md section 2).

The generator's optimizer is `config.optim` (AdamW: lr 2e-6, betas (0.9, 0.999), weight decay
0.01, 500 warm-up updates, grad-norm clip 10, set by `optim_config`); the fake-score network and
the GAN head share a second AdamW with `guidance_lr` and otherwise the same settings.
"""
import ml_collections as mlc


def method_config(**overrides) -> mlc.ConfigDict:
    c = mlc.ConfigDict({
        "name": "dmd2",
        "gen_steps": 1,                   # K: generator steps (1 = the ImageNet model)
        "backward_simulation": True,      # K > 1: train on the current generator's own inputs
        "num_train_timesteps": 1000,      # entries of the ascending Karras sigma table
        "min_step_percent": 0.02,         # DM loss sigmas: table[20 .. 980]
        "max_step_percent": 0.98,
        "real_guidance_scale": 1.0,       # CFG on the real score (1 = off; ImageNet uses none)
        "dfake_gen_update_ratio": 5,      # TTUR: generator updated every 5th step
        "gen_gan_weight": 3e-3,           # gen_cls_loss_weight (0 with guidance_gan_weight 0: no GAN)
        "guidance_gan_weight": 1e-2,      # guidance_cls_loss_weight
        "diffusion_gan_max_timestep": 1000,
        "guidance_lr": 2e-6,
        # DMD (v1) regression loss on (noise, teacher ODE output) pairs; weight 0 = DMD2.
        "regression_weight": 0.0,         # lambda_reg (DMD: 0.25)
        "regression_pairs": 25_000,       # DMD ImageNet-64: 25k pairs from Heun with 256 steps
        "regression_heun_steps": 256,
        "regression_pairs_dir": "",       # default <workdir>/regression_pairs
        "distance": "lpips",              # regression distance: l2 / pseudo_huber / lpips
        "huber_c": 0.0,
        "lpips_weights_dir": "",
        # Teacher score matching (MSD's TSM): regress generator and fake score onto the teacher's
        # denoiser first; for students that cannot copy the teacher's weights (analytic teacher,
        # smaller architectures).
        "tsm_steps": 0,
        "p_mean": -1.2,
        "p_std": 1.2,
    })
    c.update(overrides)
    return c


def optim_config(batch_size: int, lr: float = 2e-6, warmup_updates: int = 500) -> dict:
    """config.optim fields of DMD2's AdamW (warm-up given in updates, stored in images)."""
    return dict(lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=10.0,
                lr_rampup_images=warmup_updates * batch_size)
