"""CTM's method fields with the official defaults (sony/ctm cm/script_util.py; ctm-cifar10).

Config files call `method_config()` and override what their data set needs.
"""
import ml_collections as mlc


def method_config(**overrides) -> mlc.ConfigDict:
    c = mlc.ConfigDict({
        "name": "ctm",
        "num_scales": 18,             # N: Karras grid points (18 CIFAR-10, 40 ImageNet-64)
        "num_heun_step": 17,          # K_max teacher Heun steps per target (N - 1)
        "heun_step_multiplier": 1.0,  # P(k) proportional to k^multiplier ('weighted')
        "target_ema": 0.999,          # theta^- rate (fixed)
        "eval_emas": (0.999, 0.9999),
        "distance": "l2",             # l2 / pseudo_huber / lpips (official default lpips)
        "huber_c": 0.0,               # 0 = 0.00054 sqrt(dim)
        "lpips_weights_dir": "",      # vgg.pth + vgg16-397923af.pth (or .npz) for distance=lpips
        "dsm_weight": 1.0,            # denoising_weight
        "dsm_adaptive": True,         # lambda_DSM = ||grad_L CTM|| / ||grad_L DSM||
        "dsm_max_position": 0.7,      # diffusion_mult: Karras-position half of the DSM sigmas
        "p_mean": -1.2,
        "p_std": 1.2,
        # GAN phase (needs a network teacher: its encoder features are the backbone).
        "gan_weight": 0.0,            # discriminator_weight; 0 = CTM+DSM only
        "gan_start_step": 0,          # switch the GAN on at this step (e.g. resume a CTM+DSM run)
        "g_learning_period": 2,       # generator on even steps, discriminator on odd ones
        "d_lr": 2e-3,
        "d_b1": 0.5,
        "d_b2": 0.9,
        "d_optimizer": "radam",       # radam (sony/ctm code) or adam (the paper's Adam(0.5, 0.9))
        "diffaug": "color,translation,cutout",
        # Frozen feature networks, one projected discriminator each, losses averaged over them:
        # "teacher" (the network teacher's encoder, nothing to download) and/or the official
        # ("deit", "efficientnet") from user-supplied timm weight files (.pth or .npz).
        "gan_backbones": ("teacher",),
        "gan_feature_sigma": 0.002,   # noise level at which the teacher sees images
        "deit": mlc.ConfigDict({      # timm deit_base_distilled_patch16_224
            "weights": "",            # path to its state dict (.pth or .npz)
            "width": 768, "num_heads": 12, "patch_size": 16, "image_size": 224,
            "hooks": (2, 5, 8, 11),   # tapped blocks (depth = last hook + 1)
        }),
        "efficientnet": mlc.ConfigDict({  # timm tf_efficientnet_lite0
            "weights": "",            # path to its state dict (.pth or .npz)
            "width_multiplier": 1.0, "depth_multiplier": 1.0, "image_size": 224,
        }),
    })
    c.update(overrides)
    return c
