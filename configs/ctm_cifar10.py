"""CTM on CIFAR-10 from the EDM DDPM++ teacher (Kim et al. 2024; sony/ctm, Kim-Dongjun/ctm-cifar10).

Paper / official settings: Karras grid N = 18, teacher Heun steps k in 1..17 weighted by k, student
= teacher DDPM++ plus the s-embedding branch (initialised from the teacher by name), RAdam lr 4e-4,
target EMA 0.999, evaluation EMAs 0.999 / 0.9999, LPIPS distance (VGG, average pooling, 224 px),
DSM with the adaptive weight, global batch 384 (uncond) / 256 (cond), 50k CTM+DSM iterations
(the official README: 10-50k, then a GAN phase of >= 30k: resume with --config.method.gan_weight=1
--config.method.gan_start_step=<step> and, for the official backbones, gan_backbones=('deit',
'efficientnet') with their timm weight files),
1-step gamma-sampling. `:cond` gives the class-conditional variant (the paper's FID 1.73 setting).

Needs (nothing is downloaded):
  --config.teacher.checkpoint=DIR   a jaxdistill run directory holding the EDM teacher: train it
                                    with configs/edm_cifar10.py, or convert edm-cifar10-32x32-
                                    {uncond,cond}-vp.pkl into that layout
  --config.data.data_dir=TFDS_DIR   prepared with `tfds build cifar10 --data_dir=TFDS_DIR`
  --config.method.lpips_weights_dir=DIR  holding LPIPS's vgg.pth and torchvision's
                                    vgg16-397923af.pth (or their .npz conversions), or use
                                    --config.method.distance=pseudo_huber

python run.py --config=configs/ctm_cifar10.py --workdir=DIR --config.teacher.checkpoint=EDM_DIR \
  --config.data.data_dir=TFDS_DIR --config.method.lpips_weights_dir=LPIPS_DIR
"""
from jaxdistill.config import base_config
from jaxdistill.methods.ctm_config import method_config
from jaxdistill.networks import presets


def get_config(arg: str = "uncond"):
    if arg not in ("uncond", "cond"):
        raise ValueError(f"configs/ctm_cifar10.py:ARG takes uncond or cond, got {arg!r}")
    label_dim = 10 if arg == "cond" else 0
    c = base_config()
    c.method = method_config(num_scales=18, num_heun_step=17, target_ema=0.999,
                             eval_emas=(0.999, 0.9999), distance="lpips")
    teacher_net = dict(name="songunet", **presets.ddpmpp_cifar10(label_dim=label_dim,
                                                                   augment_dim=9))
    c.teacher.kind = "checkpoint"
    c.teacher.network = teacher_net
    c.network = dict(teacher_net, s_embedding=True, dropout=0.0)
    c.data.update(name="cifar10", random_flip=False)
    c.model.update(shape=(32, 32, 3), label_dim=label_dim)
    c.optim.update(lr=4e-4, lr_rampup_images=0)
    c.train.update(batch_size=384 if arg == "uncond" else 256, num_steps=50_000, log_every=100,
                   ckpt_every=2500, sample_every=2500, num_grid_samples=64)
    c.sample.update(sampler="gamma", num_steps=1, gamma=0.0)
    c.eval.update(num_samples=50_000, batch_size=500)
    return c
