"""Block reconstruction (TaQ-DiT's joint reconstruction; BRECQ / QDrop style), block by block on the MMDiT.

For each joint block, in order, the calibration points' full-precision block inputs (text tokens, image tokens,
conditioning) and outputs are cached, and the block's quantized Linears are trained to reproduce the outputs:

- **weights**: AdaRound. Each weight's level is floor(w / s) + h(alpha), h the rectified sigmoid
  clip(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1) with zeta 1.1, gamma -0.1, alpha initialised so that h
  equals the fractional part (the soft weight starts at w). Regulariser 0.01 x sum(1 - |2h - 1|^beta), off
  during the first 20% of the iterations, then beta annealed linearly 20 -> 2; Adam (default rate 1e-3).
  Afterwards each weight rounds up where h >= 1/2 (alpha >= 0), and the chosen levels go into the file.
- **activations**: LSQ. The per-tensor step of every quantized input -- one per calibrated timestep under
  per-timestep grids, one under static grids -- is learned with LSQ's gradient scale; Adam, rate 4e-5, cosine
  decay. Zero points stay as observed. Sigma-poly and dynamic grids are not trained (their steps are not
  parameters of the file): only the weights are reconstructed there.
- **QDrop**: while training, each quantized input element keeps its full-precision value with probability
  `drop_prob` (0.5), which flattens the loss landscape the activation steps are learned on.
- **shift** (TaQ-DiT's momentum): post-GELU shifts follow 0.95 shift + 0.05 batch midrange, per calibrated
  timestep, while the block trains, then freeze.

`mode="joint"` trains rounding and steps together (TaQ-DiT); `mode="separate"` trains the rounding first with
the inputs in full precision, then the steps with the rounding fixed (the baseline TaQ-DiT says converges worse).
Loss: squared error summed over tokens and features, mean over rows, both streams.

Inputs come from the full-precision model (not the partly quantized one): one cheap pass per block, and the
cache holds one block's inputs and outputs at a time. Each finished block is written to `resume_dir` (if given)
and a rerun with the same settings skips it. Training batches are drawn with a seeded NumPy generator and
QDrop's masks from a seeded MLX key, so a run is deterministic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten
from tqdm import tqdm

from taq.formats.calibration import CalibrationSet
from taq.formats.container import atomic_path
from taq.formats.quantization import LayerQuantization, Quantization
from taq.loading import Model
from taq.quant.grid import fake_quant_affine, grad_scale, group_view, lsq_grad_factor
from taq.quant.schedules import ActivationSchedule, nearest_index
from taq.quant.transforms import InputTransform
from taq.sampling.schedule import timestep_to_sigma
from taq.tracing.plan import batch_inputs, plan_batches

ZETA, GAMMA = 1.1, -0.1
MODES = ("joint", "separate")
TRAINED_ACT_MODES = ("static", "per-timestep")
MOMENTUM = 0.95


@dataclass(frozen=True)
class ReconstructionConfig:
    """TaQ-DiT's hyper-parameters, except `iters` (TaQ-DiT: 20,000 at batch 32) sized for minutes on a CPU."""

    mode: str = "joint"
    iters: int = 200
    batch_size: int = 32  # rows per step (a point is two rows, conditional and unconditional); points per cache pass
    num_samples: int = 256  # calibration points whose block inputs are cached
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    drop_prob: float = 0.5
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "beta", tuple(float(b) for b in self.beta))
        if self.mode not in MODES:
            raise ValueError(f"reconstruction mode must be one of {MODES}, got {self.mode!r}")
        for name in ("iters", "batch_size", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"reconstruction {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.drop_prob < 1 or not 0 <= self.warmup < 1:
            raise ValueError("drop_prob and warmup must be in [0, 1)")

    def beta_at(self, step: int) -> float | None:
        """The regulariser's beta at `step`, or None during the warm-up (no regulariser)."""
        start = self.warmup * self.iters
        if step < start:
            return None
        t = (step - start) / max(self.iters - start, 1)
        high, low = self.beta
        return low + (high - low) * max(0.0, 1.0 - t)


def rectified_sigmoid(alpha: mx.array) -> mx.array:
    return mx.clip(mx.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_alpha(fraction: mx.array) -> mx.array:
    """alpha with rectified_sigmoid(alpha) == fraction (in [0, 1)), up to the clip at the ends."""
    p = mx.clip((fraction - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    return mx.log(p / (1 - p))


class ReconstructedLinear(nn.Module):
    """A quantized Linear with trainable rounding (`alpha`) and input steps (`act_scale`); the original Linear is
    kept frozen. `hard` switches the weights to their final levels; `quantize_acts` off leaves inputs in full
    precision (the separate mode's first phase)."""

    def __init__(self, linear: nn.Linear, layer: LayerQuantization, drop_prob: float):
        super().__init__()
        self.linear = linear
        self.layer = layer
        self.transform = layer.transform
        weight = linear.weight.astype(mx.float32)
        if self.transform is not None:
            weight = self.transform.weight(weight)
        self._weight = weight
        spec = layer.weight_spec
        if spec is not None:
            if spec.symmetric:
                raise ValueError(f"{layer.site}: reconstruction stores uint8 levels of asymmetric grids")
            self._scale = mx.array(layer.weight.scale)[..., None]  # (O, G, 1)
            self._zero = mx.array(layer.weight.zero_point)[..., None]
            ratio = group_view(weight, spec) / self._scale
            self._floor = mx.floor(ratio)
            self.alpha = initial_alpha(ratio - self._floor)
        act = layer.act
        self.trains_act = act is not None and act.mode in TRAINED_ACT_MODES
        if self.trains_act:
            self.act_scale = mx.array(act.scale[:1] if act.mode == "static" else act.scale, dtype=mx.float32)
            self._act_zero = mx.array(act.zero_point.astype(np.float32))
        if self.transform is not None and self.transform.shift is not None:
            self.shift = mx.array(self.transform.shift)
        self.hard = False
        self.quantize_acts = True
        self.drop_prob = drop_prob
        self.train(False)
        self._sigma = None
        self._index = None

    def set_rows(self, sigma: mx.array) -> None:
        """Each row's sigma, and its calibrated timestep's index."""
        self._sigma = sigma
        schedule = self.layer.act if self.layer.act is not None else self.transform
        if schedule is not None:
            self._index = nearest_index(schedule.sigmas, sigma)

    def levels(self) -> mx.array:
        """(O, I) integer levels: soft (floor + h) while training, hard (floor + [alpha >= 0]) once `hard`."""
        spec = self.layer.weight_spec
        up = (self.alpha >= 0).astype(mx.float32) if self.hard else rectified_sigmoid(self.alpha)
        q = mx.clip(self._floor + up + self._zero, spec.qmin, spec.qmax)
        return q.reshape(self._weight.shape)

    def weight(self) -> mx.array:
        if self.layer.weight_spec is None:
            return self._weight
        spec = self.layer.weight_spec
        return ((group_view(self.levels(), spec) - self._zero) * self._scale).reshape(self._weight.shape)

    def regulariser(self, beta: float) -> mx.array:
        if self.layer.weight_spec is None or self.hard:
            return mx.array(0.0)
        return mx.sum(1 - mx.power(mx.abs(2 * rectified_sigmoid(self.alpha) - 1), beta))

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype
        x = x.astype(mx.float32)
        offset = None
        if self.transform is not None:
            if self.transform.shift is not None:
                if self.training:
                    self._update_shift(x)
                rows = self.shift[0:1] if self.shift.shape[0] == 1 else self.shift[self._index]
                offset = mx.stop_gradient(rows)[:, None, :]
                x = x - offset
            if self.transform.divisor is not None:
                divisor = mx.array(self.transform.divisor)
                x = x / divisor
                offset = None if offset is None else offset / divisor
        act = self.layer.act
        if act is not None and self.quantize_acts:
            if self.trains_act:
                scale = self.act_scale[0:1] if self.act_scale.shape[0] == 1 else self.act_scale[self._index]
                zero = self._act_zero[0:1] if self.act_scale.shape[0] == 1 else self._act_zero[self._index]
                scale = grad_scale(scale, lsq_grad_factor(x[0].size, act.qmax))
            else:
                scale, zero = act.grid_at(self._sigma)
                scale, zero = mx.stop_gradient(scale), mx.stop_gradient(zero)
            shape = (-1,) + (1,) * (x.ndim - 1)
            quantized = fake_quant_affine(x, scale.reshape(shape), zero.reshape(shape), 0, act.qmax)
            if self.training and self.drop_prob > 0:
                keep = mx.random.bernoulli(1 - self.drop_prob, x.shape)
                quantized = mx.where(keep, quantized, x)
            x = quantized
        if offset is not None:
            x = x + offset
        y = x @ self.weight().T
        if "bias" in self.linear:
            y = y + self.linear.bias.astype(mx.float32)
        return y.astype(dtype)

    def _update_shift(self, x: mx.array) -> None:
        """shift <- 0.95 shift + 0.05 midrange of this batch's rows, per calibrated timestep present."""
        x = mx.stop_gradient(x)
        low, high = mx.min(x, axis=1), mx.max(x, axis=1)  # (B, C)
        if self.shift.shape[0] == 1:
            mid = (mx.min(low, axis=0) + mx.max(high, axis=0))[None] / 2
            self.shift = MOMENTUM * self.shift + (1 - MOMENTUM) * mid
            return
        member = self._index[None, :] == mx.arange(self.shift.shape[0])[:, None]  # (T, B)
        big = mx.array(np.finfo(np.float32).max)
        lo = mx.min(mx.where(member[..., None], low[None], big), axis=1)
        hi = mx.max(mx.where(member[..., None], high[None], -big), axis=1)
        present = mx.any(member, axis=1)[:, None]
        updated = MOMENTUM * self.shift + (1 - MOMENTUM) * (lo + hi) / 2
        self.shift = mx.where(present, updated, self.shift)

    def result(self) -> LayerQuantization:
        """The layer with its learned levels, steps and final shift."""
        layer = self.layer
        levels = None
        if layer.weight_spec is not None:
            if not self.hard:
                raise RuntimeError("result() comes after training, once the rounding is hard")
            levels = np.array(self.levels()).astype(np.uint8)
        act = layer.act
        if self.trains_act:
            scale = np.array(self.act_scale, np.float64)
            act = ActivationSchedule(act.mode, act.bits, act.sigmas, np.broadcast_to(scale, act.scale.shape).copy(),
                                     act.zero_point, act.lo, act.hi, act.poly_lo, act.poly_hi)
        transform = layer.transform
        if transform is not None and transform.shift is not None:
            transform = InputTransform(transform.sigmas, np.array(self.shift, np.float32), transform.divisor)
        return replace(layer, act=act, transform=transform, levels=levels)


def reconstruct(model: Model, cal: CalibrationSet, quantization: Quantization, config: ReconstructionConfig, *,
                resume_dir: str | Path | None = None, progress: bool = True) -> Quantization:
    """`quantization` with every joint block's quantized layers reconstructed under `config`."""
    mmdit = model.mmdit
    layers_by_block = _layers_by_block(quantization)
    rows = _block_zero_inputs(model, cal, config)
    resume = Path(resume_dir) if resume_dir is not None else None
    if resume is not None:
        resume.mkdir(parents=True, exist_ok=True)
    key = _run_key(quantization, config)
    results: dict[str, LayerQuantization] = {}
    txt, img, c, sigma = rows
    for index, block in enumerate(mmdit.joint_blocks):
        target_txt, target_img = _run_block(block, txt, img, c, config.batch_size)
        layers = layers_by_block.get(index, {})
        if layers:
            done = _load_block(resume, index, key, layers)
            if done is None:
                done = _reconstruct_block(mmdit, index, layers, (txt, img, c, sigma), (target_txt, target_img),
                                          config, progress)
                _save_block(resume, index, key, done)
            results.update(done)
        txt, img = target_txt, target_img
    layers = {site: results.get(site, layer) for site, layer in quantization.layers.items()}
    meta = dict(quantization.meta, label=quantization.meta.get("label", "") + f" +{config.mode} reconstruction",
                reconstruction=_config_dict(config))
    return Quantization(layers, meta)


def _config_dict(config: ReconstructionConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _layers_by_block(quantization: Quantization) -> dict[int, dict[str, LayerQuantization]]:
    blocks: dict[int, dict[str, LayerQuantization]] = {}
    for site, layer in quantization.layers.items():
        parts = layer.path.split(".")
        if parts[0] != "joint_blocks":
            raise ValueError(f"{site}: reconstruction covers the joint blocks' layers only ({layer.path})")
        blocks.setdefault(int(parts[1]), {})[site] = layer
    return blocks


def _block_zero_inputs(model: Model, cal: CalibrationSet, config: ReconstructionConfig) -> tuple[mx.array, ...]:
    """The first block's inputs for every row of `num_samples` calibration points, and each row's sigma."""
    txt, img, c, sigma = [], [], [], []
    for batch in plan_batches(cal, config.num_samples, config.seed, config.batch_size):
        x, t, tokens, pooled = batch_inputs(cal, batch)
        parts = model.mmdit.embed(x, t, tokens, pooled)
        mx.eval(parts)
        for store, part in zip((txt, img, c), parts):
            store.append(part)
        sigma.append(timestep_to_sigma(t.astype(mx.float32)))
    return tuple(mx.concatenate(parts) for parts in (txt, img, c, sigma))


def _run_block(block, txt, img, c, batch_size: int) -> tuple[mx.array, mx.array]:
    """The full-precision block's outputs for all rows, in batches (None text for the last block)."""
    outs_txt, outs_img = [], []
    for start in range(0, img.shape[0], batch_size):
        part = slice(start, start + batch_size)
        out_txt, out_img = block(txt[part], img[part], c[part])
        mx.eval(out_img, out_txt if out_txt is not None else [])
        outs_img.append(out_img)
        outs_txt.append(out_txt)
    return (None if outs_txt[0] is None else mx.concatenate(outs_txt)), mx.concatenate(outs_img)


def _reconstruct_block(mmdit, index: int, layers: dict[str, LayerQuantization], inputs, targets,
                       config: ReconstructionConfig, progress: bool) -> dict[str, LayerQuantization]:
    block = mmdit.joint_blocks[index]
    modules = dict(mmdit.named_modules())
    originals = {layer.path: modules[layer.path] for layer in layers.values()}
    wrapped = {site: ReconstructedLinear(originals[layer.path], layer, config.drop_prob)
               for site, layer in layers.items()}
    mmdit.update_modules(tree_unflatten([(layers[site].path, module) for site, module in wrapped.items()]))
    try:
        phases = [("joint", True, True)] if config.mode == "joint" else [("weights", True, False),
                                                                          ("activations", False, True)]
        for name, train_weights, train_acts in phases:
            _train(block, wrapped, inputs, targets, config, train_weights, train_acts,
                   desc=f"reconstruct block {index} ({name})", progress=progress,
                   seed=(config.seed, index, len(name)))
        for module in wrapped.values():
            module.hard = True
        return {site: module.result() for site, module in wrapped.items()}
    finally:
        mmdit.update_modules(tree_unflatten(list(originals.items())))
        block.unfreeze()  # _train froze it to pick the trainable parameters


def _train(block, wrapped: dict[str, ReconstructedLinear], inputs, targets, config: ReconstructionConfig,
           train_weights: bool, train_acts: bool, desc: str, progress: bool, seed: tuple) -> None:
    txt, img, c, sigma = inputs
    target_txt, target_img = targets
    block.freeze()
    keys = (["alpha"] if train_weights else []) + (["act_scale"] if train_acts else [])
    for module in wrapped.values():
        module.hard = not train_weights
        module.quantize_acts = train_acts
        module.train(True)
        module.unfreeze(recurse=False, keys=[k for k in keys if k in module])
    if not any(module.trainable_parameters() for module in wrapped.values()):
        return
    optimizer = optim.MultiOptimizer(
        [optim.Adam(learning_rate=config.weight_lr),
         optim.Adam(learning_rate=optim.cosine_decay(config.act_lr, config.iters))],
        filters=[lambda path, _: path.endswith("alpha")])

    def loss_fn(batch, reg_on, beta):
        b_txt, b_img, b_c, b_sigma, t_txt, t_img = batch
        for module in wrapped.values():
            module.set_rows(b_sigma)
        out_txt, out_img = block(b_txt, b_img, b_c)
        rec = mx.sum(mx.square(out_img - t_img)) / b_img.shape[0]
        if out_txt is not None:
            rec = rec + mx.sum(mx.square(out_txt - t_txt)) / b_txt.shape[0]
        reg = sum(module.regulariser(beta) for module in wrapped.values())
        return rec + reg_on * config.reg_weight * reg, rec

    grad_fn = nn.value_and_grad(block, loss_fn)
    rng = np.random.default_rng(seed)
    mx.random.seed(int(rng.integers(2**31)))
    state = [block.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, reg_on, beta):
        (_, rec), grads = grad_fn(batch, reg_on, beta)
        optimizer.update(block, grads)
        return rec

    rows = img.shape[0]
    with tqdm(total=config.iters, desc=desc, unit="it", disable=not progress, leave=False) as bar:
        for i in range(config.iters):
            pick = mx.array(np.sort(rng.choice(rows, min(config.batch_size, rows), replace=False)))
            batch = (txt[pick], img[pick], c[pick], sigma[pick],
                     target_txt[pick] if target_txt is not None else mx.zeros((0,)), target_img[pick])
            beta = config.beta_at(i) if train_weights else None
            rec = step(batch, mx.array(0.0 if beta is None else 1.0), mx.array(beta or config.beta[0]))
            mx.eval(rec, state)
            if i % 20 == 0 or i == config.iters - 1:
                bar.set_postfix(loss=f"{rec.item():.4g}")
            bar.update()
    for module in wrapped.values():
        module.train(False)


# --------------------------------------------------------------------------- resuming


def _run_key(quantization: Quantization, config: ReconstructionConfig) -> str:
    """What a finished block depends on: the quantization's record and the reconstruction settings."""
    record = json.dumps({"meta": quantization.meta, "reconstruction": _config_dict(config)}, sort_keys=True,
                        default=str)
    return hashlib.sha256(record.encode()).hexdigest()[:16]


def _save_block(resume: Path | None, index: int, key: str, layers: dict[str, LayerQuantization]) -> None:
    if resume is None:
        return
    from safetensors.numpy import save

    arrays = {}
    for site, layer in layers.items():
        if layer.levels is not None:
            arrays[f"{site}/levels"] = layer.levels
        if layer.act is not None:
            arrays[f"{site}/act_scale"] = np.asarray(layer.act.scale, np.float64)
        if layer.transform is not None and layer.transform.shift is not None:
            arrays[f"{site}/shift"] = layer.transform.shift
    with atomic_path(resume / f"block_{index:02d}.safetensors") as tmp:
        tmp.write_bytes(save(arrays, metadata={"key": key}))


def _load_block(resume: Path | None, index: int, key: str,
                layers: dict[str, LayerQuantization]) -> dict[str, LayerQuantization] | None:
    """The block's reconstructed layers from an earlier run with the same key, or None."""
    path = None if resume is None else resume / f"block_{index:02d}.safetensors"
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    done = {}
    for site, layer in layers.items():
        act, transform = layer.act, layer.transform
        if f"{site}/act_scale" in arrays:
            act = replace(act, scale=arrays[f"{site}/act_scale"])
        if f"{site}/shift" in arrays:
            transform = InputTransform(transform.sigmas, arrays[f"{site}/shift"], transform.divisor)
        done[site] = replace(layer, act=act, transform=transform, levels=arrays.get(f"{site}/levels"))
    return done
