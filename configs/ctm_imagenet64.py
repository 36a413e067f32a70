"""CTM on ImageNet-64 (class-conditional) from the EDM ADM teacher (sony/ctm commands/
CTM+DSM_command.sh): N = 40, k in 1..39 weighted by k, RAdam lr 4e-4 with global batch 1440 for the
CTM+DSM phase (the official command's values), target EMA 0.999, evaluation EMAs 0.999 / 0.9999 /
0.9999432189950708, LPIPS distance, 25k iterations before the GAN phase (method.gan_weight / gan_start_step /
gan_backbones, as in configs/ctm_cifar10.py).

Needs --config.teacher.checkpoint (EDM ADM teacher run directory, e.g. a converted
edm-imagenet-64x64-cond-adm.pkl), --config.data.data_dir (tfds imagenet_resized/64x64) and
--config.method.lpips_weights_dir.
"""
from jaxdistill.config import base_config
from jaxdistill.methods.ctm_config import method_config
from jaxdistill.networks import presets


def get_config():
    c = base_config()
    c.method = method_config(num_scales=40, num_heun_step=39, target_ema=0.999,
                             eval_emas=(0.999, 0.9999, 0.9999432189950708), distance="lpips")
    teacher_net = dict(name="dhariwal", **presets.adm_imagenet64(label_dim=1000))
    c.teacher.kind = "checkpoint"
    c.teacher.network = teacher_net
    c.network = dict(teacher_net, s_embedding=True, dropout=0.0)
    c.data.update(name="imagenet64", random_flip=False)
    c.model.update(shape=(64, 64, 3), label_dim=1000)
    c.optim.update(lr=4e-4, lr_rampup_images=0)
    c.train.update(batch_size=1440, num_steps=25_000, log_every=100, ckpt_every=2500,
                   sample_every=2500, num_grid_samples=64)
    c.sample.update(sampler="gamma", num_steps=1, gamma=0.0)
    c.eval.update(num_samples=50_000, batch_size=500)
    return c
