"""timm's auto-augment policies by timm's semantics, as batched torch ops with per-sample params.

timm (``timm/data/auto_augment.py``) runs its ops on PIL images; these kernels compute what
PIL computes (``ImageEnhance`` blends in float32 truncated to levels, ``convert('L')``'s
integer weights, ``ImageOps.autocontrast``'s truncating table, ``Image.transform`` with
bilinear/bicubic and the fill colour), so a batch here is the batch timm would produce for
the same draws. Sampling follows timm's draws in its order: for RandAugment, ``num_ops`` ops
chosen with replacement (without, under choice weights), each applied with probability 0.5,
magnitude ~ N(m, mstd) clipped to [0, mmax or 10], random sign; for AutoAugment, one
sub-policy of (op, prob, magnitude) pairs.
"""
from __future__ import annotations

import numpy as np
import torch

from fastload.spec import TimmRandAugment

from .augment import equalize, invert, posterize, rotate_matrix, shear_matrix, solarize, translate_matrix

LEVEL_DENOM = 10.0
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_CHOICE_WEIGHTS = {"Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
                       "Color": .025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": .005, "SolarizeAdd": .005,
                       "Contrast": .005, "Brightness": .005, "Equalize": .005, "Posterize": 0, "Invert": 0}

_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)), (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)), (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)), (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)), (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)), (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)), (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)), (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)), (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)), (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)), (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)), (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)), (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
_ORIGINAL = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)), (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)), (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)), (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)), (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def _research(policy):  # the 'r' variants: Posterize* -> PosterizeIncreasing
    return tuple(tuple((("PosterizeIncreasing" if n.startswith("Posterize") else n), p, m) for n, p, m in sub)
                 for sub in policy)


AUTO_POLICIES = {"v0": _V0, "v0r": _research(_V0), "original": _ORIGINAL, "originalr": _research(_ORIGINAL)}


# --------------------------------------------------------------------------- PIL-exact kernels
def _per(v, x):
    return torch.as_tensor(np.asarray(v, np.float32), device=x.device).view(-1, 1, 1, 1)


def pil_blend(degenerate: torch.Tensor, x: torch.Tensor, factor) -> torch.Tensor:
    """``Image.blend(degenerate, x, factor)`` on 8-bit images: float32 ``d + f * (x - d)``,
    clipped and truncated to a level."""
    out = degenerate + _per(factor, x) * (x - degenerate)
    return out.clamp_(0.0, 255.0).floor_()


def pil_luma(x: torch.Tensor) -> torch.Tensor:
    """``convert('L')``: (19595 R + 38470 G + 7471 B + 32768) >> 16, as N1HW."""
    v = x.to(torch.int64)
    return ((v[:, 0] * 19595 + v[:, 1] * 38470 + v[:, 2] * 7471 + 32768) >> 16).unsqueeze(1).to(x.dtype)


def color(x, factor):
    return pil_blend(pil_luma(x).expand_as(x), x, factor)


def contrast(x, factor):
    mean = torch.floor(pil_luma(x).mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64) + 0.5).to(x.dtype)
    return pil_blend(mean.expand_as(x), x, factor)


def brightness(x, factor):
    return pil_blend(torch.zeros_like(x), x, factor)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """``ImageFilter.SMOOTH``: the 3x3 kernel (1 1 1, 1 5 1, 1 1 1) / 13, rounded; edges copied."""
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float32, device=x.device)
    n, c, h, w = x.shape
    inner = torch.nn.functional.conv2d(x.reshape(n * c, 1, h, w), (k / 13.0).view(1, 1, 3, 3))
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = (inner.reshape(n, c, h - 2, w - 2) + 0.5).floor_().clamp_(0, 255)
    return out


def sharpness(x, factor):
    return pil_blend(smooth(x), x, factor)


def autocontrast(x, _=None):
    """``ImageOps.autocontrast``: per channel, lo..hi to 0..255 by ``int(v * scale + offset)``."""
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    scale = 255.0 / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    out = (x.double() * scale - lo * scale).trunc().clamp(0, 255).to(x.dtype)
    return torch.where(hi > lo, out, x)


def solarize_add(x, add, threshold=128):
    return torch.where(x < threshold, (x + _per(add, x)).clamp(max=255.0), x)


def pil_affine(x: torch.Tensor, matrices, fill, resample: str) -> torch.Tensor:
    """``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)``: output pixel centre
    (u + .5, v + .5) samples input (a u' + b v' + c, d u' + e v' + f); a sample outside the image
    keeps the fill; bilinear and bicubic (PIL's Geometry.c: cubic a = -1, edge rows and columns
    repeated) truncate to a level."""
    n, c, h, w = x.shape
    m = torch.as_tensor(np.asarray(matrices, np.float64), device=x.device).view(n, 6, 1)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=x.device, dtype=torch.float64) + 0.5, indexing="ij")
    xs, ys = xs.reshape(1, h * w), ys.reshape(1, h * w)
    sx = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # PIL's affine_transform, term by term (no fused multiply-add)
    sy = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    flat = x.reshape(n, c, h * w).double()
    fill_t = torch.as_tensor(fill, dtype=torch.float64, device=x.device).view(1, c, 1)

    def tap(yy, xx):  # clipped neighbour (PIL's XCLIP/YCLIP)
        idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).unsqueeze(1).expand(n, c, h * w)
        return flat.gather(2, idx)

    fx, fy = sx - 0.5, sy - 0.5
    x0, y0 = fx.floor(), fy.floor()
    dx, dy = (fx - x0).unsqueeze(1), (fy - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    if resample == "bilinear":
        def row(yy):
            a, b = tap(yy, x0), tap(yy, x0 + 1)
            return a + (b - a) * dx
        v1 = row(y0)
        below = ((y0 + 1) >= 0) & ((y0 + 1) < h)
        v2 = torch.where(below.unsqueeze(1), row(y0 + 1), v1)
        out = v1 + (v2 - v1) * dy
    else:
        def cubic(v1, v2, v3, v4, d):
            p2, p3, p4 = -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4
            return v2 + d * (p2 + d * (p3 + d * p4))

        def row(yy):
            return cubic(tap(yy, x0 - 1), tap(yy, x0), tap(yy, x0 + 1), tap(yy, x0 + 2), dx)
        rows = [row(y0 - 1)]
        for k in range(3):  # PIL: a row outside the image repeats the one before
            yy = y0 + k
            ok = ((yy >= 0) & (yy < h)).unsqueeze(1)
            rows.append(torch.where(ok, row(yy), rows[-1]))
        out = cubic(*rows, dy)
    out = out.clamp(0, 255).trunc()
    out = torch.where(inside.unsqueeze(1), out, fill_t.expand(n, c, h * w))
    return out.view(n, c, h, w).to(x.dtype)


# --------------------------------------------------------------------------- ops: (x, args, fill, resample)
def _geometric(kind):
    def op(x, args, fill, resample):
        h, w = x.shape[2], x.shape[3]
        make = {"Rotate": lambda a: rotate_matrix(a, h, w), "ShearX": lambda a: shear_matrix(a, 0.0),
                "ShearY": lambda a: shear_matrix(0.0, a), "TranslateXRel": lambda a: translate_matrix(a * w, 0.0),
                "TranslateYRel": lambda a: translate_matrix(0.0, a * h)}[kind]
        return pil_affine(x, [make(float(a)) for a in args], fill, resample)
    return op


def _posterize(x, bits, fill, resample):
    bits = np.asarray(bits, np.int64)
    keep = bits < 8  # timm: 8 bits or more leave the image as it is
    if keep.all():
        return posterize(x, bits)
    out = x.clone()
    sel = torch.from_numpy(np.flatnonzero(keep)).to(x.device)
    out[sel] = posterize(x[sel], bits[keep])
    return out


OPS = {
    "AutoContrast": lambda x, a, fill, r: autocontrast(x), "Equalize": lambda x, a, fill, r: equalize(x),
    "Invert": lambda x, a, fill, r: invert(x), "Posterize": _posterize,
    "Solarize": lambda x, a, fill, r: solarize(x, np.asarray(a)), "SolarizeAdd": lambda x, a, fill, r: solarize_add(x, a),
    "Color": lambda x, a, fill, r: color(x, a), "Contrast": lambda x, a, fill, r: contrast(x, a),
    "Brightness": lambda x, a, fill, r: brightness(x, a), "Sharpness": lambda x, a, fill, r: sharpness(x, a),
    **{k: _geometric(k) for k in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")},
}


def _kernel_name(name: str) -> str:
    """Level variants share a kernel: PosterizeIncreasing -> Posterize, ColorIncreasing -> Color..."""
    for suffix in ("Increasing", "Original"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- levels -> arguments (timm's)
def level_args(name: str, level: np.ndarray, negate: np.ndarray, translate_pct: float = 0.45) -> np.ndarray:
    """timm's ``LEVEL_TO_ARG`` for many images: ``level`` on the 0..10 scale, ``negate`` the
    random sign draws (used by the ops timm negates)."""
    f = level / LEVEL_DENOM
    sign = np.where(negate, -1.0, 1.0)
    if name == "Rotate":
        return f * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return f * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return f * translate_pct * sign
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return f * 1.8 + 0.1
    if name.endswith("Increasing") and name[: -len("Increasing")] in ("Color", "Contrast", "Brightness", "Sharpness"):
        return np.maximum(0.1, 1.0 + f * 0.9 * sign)
    if name == "Posterize":
        return (f * 4).astype(np.int64).astype(np.float64)
    if name == "PosterizeIncreasing":
        return 4 - (f * 4).astype(np.int64).astype(np.float64)
    if name == "PosterizeOriginal":
        return (f * 4).astype(np.int64).astype(np.float64) + 4
    if name == "Solarize":
        return (f * 256).astype(np.int64).astype(np.float64)
    if name == "SolarizeIncreasing":
        return 256 - (f * 256).astype(np.int64).astype(np.float64)
    if name == "SolarizeAdd":
        return (f * 110).astype(np.int64).astype(np.float64)
    return np.zeros_like(level)  # AutoContrast, Equalize, Invert: no argument


# --------------------------------------------------------------------------- sampling (make_params)
def _magnitudes(rng, m, std: float, top: float, n: int) -> np.ndarray:
    """timm's magnitude noise: N(m, std), or U(0, m) for std = inf; clipped to [0, top]."""
    m = np.broadcast_to(np.asarray(m, np.float64), (n,))
    if std == float("inf"):
        level = rng.uniform(0, m)
    elif std > 0:
        level = rng.normal(m, std)
    else:
        level = m.copy()
    return np.clip(level, 0.0, top)


def sample_timm_policy(rng: np.random.Generator, policy, n: int, resample: str | None):
    """Per op slot: (op name per image ('Identity': skipped), argument per image, resample per
    image). ``resample`` None: timm's random choice of bilinear or bicubic per op."""
    slots = []

    def finish(names, levels, applies):
        negate = rng.random(n) > 0.5
        args = np.zeros(n)
        for name in set(names.tolist()):
            sel = names == name
            args[sel] = level_args(name, levels[sel], negate[sel])
        names = np.where(applies, names, "Identity").astype(object)
        how = np.full(n, resample, object) if resample else np.where(rng.random(n) < 0.5, "bilinear", "bicubic")
        slots.append((names, args, how))

    if isinstance(policy, TimmRandAugment):
        ops = np.array(RAND_INCREASING_OPS if policy.increasing else RAND_OPS, object)
        top = policy.magnitude_max or LEVEL_DENOM
        if policy.weights is None:  # with replacement, uniform (np.random.choice's default)
            chosen = rng.integers(0, len(ops), size=(n, policy.num_ops))
        else:  # timm: weighted choice without replacement (weights are over the non-increasing names)
            p = np.array([RAND_CHOICE_WEIGHTS[k] for k in RAND_OPS])
            chosen = np.stack([rng.choice(len(ops), policy.num_ops, replace=False, p=p / p.sum()) for _ in range(n)])
        for k in range(policy.num_ops):
            applies = rng.random(n) <= policy.prob
            finish(ops[chosen[:, k]], _magnitudes(rng, policy.magnitude, policy.magnitude_std, top, n), applies)
    else:
        table = AUTO_POLICIES[policy.policy]
        which = rng.integers(0, len(table), size=n)
        for k in range(2):
            names = np.array([table[i][k][0] for i in which], object)
            probs = np.array([table[i][k][1] for i in which])
            levels = np.array([float(table[i][k][2]) for i in which])
            applies = rng.random(n) <= probs
            finish(names, _magnitudes(rng, levels, policy.magnitude_std, LEVEL_DENOM, n), applies)
    return slots


def apply_timm_policy(x: torch.Tensor, slots, fill) -> torch.Tensor:
    """Apply sampled slots to NCHW float 0..255 images (whole levels)."""
    x = x.clone()
    for names, args, how in slots:
        for name, resample in sorted(set(zip(names.tolist(), how.tolist()))):
            if name == "Identity":
                continue
            sel = np.flatnonzero((names == name) & (how == resample))
            t = torch.from_numpy(sel).to(x.device)
            x[t] = OPS[_kernel_name(name)](x[t], args[sel], fill, resample)
    return x


def timm_fill(mean) -> tuple[int, int, int]:
    """timm's ``img_mean`` fill for the geometric ops: round(255 * mean), at most 255."""
    return tuple(min(255, round(255 * m)) for m in mean)

