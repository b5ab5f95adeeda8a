"""Train the pocket model with SD3's recipe on 16x16x1 digit latents.

    python -m taq.pocket.train --out taq/pocket/weights/pocket.safetensors [--steps N --batch-size B --seed S]

Rectified flow (x_t = (1 - s) x0 + s e, target v = e - x0, MSE), logit-normal s = sigmoid(n), n ~ N(0, 1),
10% of prompts replaced by "" so classifier-free guidance works, AdamW with linear warmup then cosine decay,
and an EMA of the weights, which is what gets saved (float16). MMDiT and text encoder train jointly.
All randomness of a step (batch rows, paraphrases, dropout, noise, sigma) comes from one numpy Generator,
so a run is reproducible and resumes exactly from its last checkpoint (`--resume`).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from taq.config import MMDiTConfig, get_preset
from taq.formats.container import load_npz, save_npz
from taq.models.checkpoint import load_into
from taq.models.mmdit import zero_init_modulation
from taq.pocket import PocketModel, save_pocket
from taq.pocket.data import images_to_latents, split_digits
from taq.pocket.prompts import random_prompts
from taq.pocket.text_encoder import TextEncoderConfig, Tokenizer, pocket_text_encoder_config

STATE_KIND = "pocket-train-state"
STATE_VERSION = 1
RESUMABLE_CHANGES = ("checkpoint_every", "log_every", "compile")  # fields a resumed run may change


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 8_000
    batch_size: int = 512
    lr: float = 3e-4
    final_lr_fraction: float = 0.1  # cosine decay ends at lr * this
    warmup_steps: int = 300
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    seed: int = 0
    split_seed: int = 0  # the held-out split (evaluation must use the same)
    checkpoint_every: int = 250
    log_every: int = 50
    compile: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} for {self.steps} steps")
        if not 0.0 <= self.cond_dropout <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1] and ema_decay in [0, 1), "
                             f"got {self.cond_dropout} and {self.ema_decay}")


# --------------------------------------------------------------------------- the objective


def logit_normal_sigmas(rng: np.random.Generator, n: int) -> np.ndarray:
    """SD3's noise-level sampling: sigmoid of a standard normal, (n,) float32 in (0, 1)."""
    return (1.0 / (1.0 + np.exp(-rng.standard_normal(n)))).astype(np.float32)


def flow_matching_loss(model: PocketModel, x0: mx.array, ids: mx.array, noise: mx.array, sigma: mx.array) -> mx.array:
    """MSE between the predicted and the true velocity e - x0 at x_t = (1 - s) x0 + s e."""
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    return mx.mean(mx.square(model(x_t, 1000 * sigma, ids) - (noise - x0)))


def make_batch(rng: np.random.Generator, latents: np.ndarray, labels: np.ndarray, tokenizer: Tokenizer,
               batch_size: int, cond_dropout: float) -> dict[str, np.ndarray]:
    """One step's inputs: random rows, a random paraphrase each (or "" with prob. cond_dropout), noise, sigma."""
    rows = rng.integers(0, len(latents), size=batch_size)
    prompts = random_prompts(labels[rows], rng, dropout=cond_dropout)
    return {"x0": latents[rows], "ids": tokenizer(prompts),
            "noise": rng.standard_normal(latents[rows].shape).astype(np.float32),
            "sigma": logit_normal_sigmas(rng, batch_size)}


def learning_rate_schedule(cfg: TrainConfig):
    cosine = optim.cosine_decay(cfg.lr, cfg.steps - cfg.warmup_steps, cfg.lr * cfg.final_lr_fraction)
    if cfg.warmup_steps == 0:
        return cosine
    return optim.join_schedules([optim.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), cosine], [cfg.warmup_steps])


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """The model, its EMA copy and the optimizer, with one (optionally compiled) update per call."""

    def __init__(self, cfg: TrainConfig, mmdit_config: MMDiTConfig, text_config: TextEncoderConfig):
        self.cfg = cfg
        mx.random.seed(cfg.seed)
        self.model = PocketModel(mmdit_config, text_config)
        zero_init_modulation(self.model.mmdit)  # adaLN-Zero: every block starts as the identity
        self.ema = PocketModel(mmdit_config, text_config)
        self.ema.update(self.model.parameters())
        self.optimizer = optim.AdamW(learning_rate=learning_rate_schedule(cfg), weight_decay=cfg.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())
        self.step_count = 0
        self._update = None  # built on first use, after a resume may have replaced the state

    def _build_update(self):
        loss_and_grad = nn.value_and_grad(self.model, flow_matching_loss)

        def update(x0, ids, noise, sigma, ema_decay):
            loss, grads = loss_and_grad(self.model, x0, ids, noise, sigma)
            grads, _ = optim.clip_grad_norm(grads, self.cfg.grad_clip)
            self.optimizer.update(self.model, grads)
            self.ema.update(tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                     self.ema.parameters(), self.model.parameters()))
            return loss

        if not self.cfg.compile:
            return update
        state = [self.model.state, self.ema.state, self.optimizer.state]
        return mx.compile(update, inputs=state, outputs=state)

    def ema_decay(self) -> float:
        """The EMA decay, warmed up so early steps are not dominated by the random initialization."""
        return min(self.cfg.ema_decay, (1 + self.step_count) / (10 + self.step_count))

    def step(self, batch: dict[str, np.ndarray]) -> mx.array:
        """One optimizer step; returns the (lazy) loss and schedules the new state."""
        if self._update is None:
            self._update = self._build_update()
        loss = self._update(*(mx.array(batch[k]) for k in ("x0", "ids", "noise", "sigma")),
                            mx.array(self.ema_decay(), dtype=mx.float32))
        self.step_count += 1
        mx.async_eval(loss, self.model.state, self.ema.state, self.optimizer.state)
        return loss

    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate)

    # -- resumable state

    def save_state(self, path: Path, rng: np.random.Generator, elapsed: float) -> None:
        arrays = {}
        for prefix, tree in (("model", self.model.parameters()), ("ema", self.ema.parameters()),
                             ("optimizer", self.optimizer.state)):
            arrays.update({f"{prefix}.{k}": np.array(v) for k, v in tree_flatten(tree)})
        meta = {"step": self.step_count, "rng": rng.bit_generator.state, "elapsed": elapsed,
                "train_config": asdict(self.cfg)}
        save_npz(path, arrays, meta, kind=STATE_KIND, version=STATE_VERSION)

    def load_state(self, path: Path, rng: np.random.Generator) -> float:
        """Restore a saved state into this trainer and `rng`; returns the elapsed seconds it recorded."""
        if self._update is not None:
            raise RuntimeError("load_state must come before the first step (the compiled update holds the state)")
        arrays, meta = load_npz(path, kind=STATE_KIND, version=STATE_VERSION, required={})
        saved, current = meta["train_config"], asdict(self.cfg)
        differing = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if differing:
            raise ValueError(f"{path}: cannot resume with a different {', '.join(differing)} "
                             f"(saved {[saved.get(k) for k in differing]}, now {[current[k] for k in differing]})")
        parts = {"model": [], "ema": [], "optimizer": []}
        for key, value in arrays.items():
            prefix, _, rest = key.partition(".")
            parts[prefix].append((rest, mx.array(value)))
        load_into(self.model, dict(parts["model"]), source=f"{path} (model)")
        load_into(self.ema, dict(parts["ema"]), source=f"{path} (ema)")
        self.optimizer.state = tree_unflatten(parts["optimizer"])
        self.step_count = int(meta["step"])
        rng.bit_generator.state = meta["rng"]
        return float(meta["elapsed"])


# --------------------------------------------------------------------------- the run


def companion_paths(out: Path) -> tuple[Path, Path]:
    """The loss log and the resumable training state written next to the weights file."""
    stem = out.with_suffix("")
    return stem.with_name(stem.name + ".loss.csv"), stem.with_name(stem.name + ".train-state.npz")


def train(cfg: TrainConfig, out: str | Path, mmdit_config: MMDiTConfig | None = None,
          text_config: TextEncoderConfig | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train, writing EMA weights to `out` at every checkpoint and at the end; returns a summary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path, state_path = companion_paths(out)
    mmdit_config = mmdit_config or get_preset("pocket").mmdit
    text_config = text_config or pocket_text_encoder_config()

    split = split_digits(seed=cfg.split_seed)
    latents = images_to_latents(split.train_images)  # (N, 16, 16, 1)
    rng = np.random.default_rng(cfg.seed)
    trainer = Trainer(cfg, mmdit_config, text_config)
    elapsed_before = 0.0
    if resume and state_path.exists():
        elapsed_before = trainer.load_state(state_path, rng)
    start_step = trainer.step_count
    log_rows = _read_log(log_path, start_step) if start_step else []

    with open(log_path, "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "loss", "lr", "elapsed_s"])
        log.writerows(log_rows)
        started = time.perf_counter()
        first_step_s = 0.0
        pending = []  # losses since the last log row
        bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not progress,
                   desc="pocket", unit="step")
        for step in bar:
            batch = make_batch(rng, latents, split.train_labels, trainer.model.text_encoder.tokenizer,
                               cfg.batch_size, cfg.cond_dropout)
            pending.append(trainer.step(batch))
            done = step + 1
            if step == start_step:  # the first step builds (and compiles) the update: time it apart
                mx.eval(pending[-1])
                first_step_s = time.perf_counter() - started
            if done % cfg.log_every == 0 or done == cfg.steps:
                loss = float(mx.mean(mx.stack(pending)))
                pending = []
                elapsed = elapsed_before + time.perf_counter() - started
                log.writerow([done, f"{loss:.6f}", f"{trainer.learning_rate():.3e}", f"{elapsed:.2f}"])
                log_file.flush()
                bar.set_postfix(loss=f"{loss:.4f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                elapsed = elapsed_before + time.perf_counter() - started
                metadata = _weights_metadata(cfg, done, split)
                save_pocket(out, trainer.ema, metadata)
                trainer.save_state(state_path, rng, elapsed)
        bar.close()

    seconds = time.perf_counter() - started
    steps_run = cfg.steps - start_step
    rate = (steps_run - 1) / (seconds - first_step_s) if steps_run > 1 else float("nan")
    summary = {"out": str(out), "steps": cfg.steps, "steps_run": steps_run, "seconds": round(seconds, 2),
               "first_step_s": round(first_step_s, 2), "steps_per_s": round(rate, 2),
               "device": str(mx.default_device()), "loss_log": str(log_path)}
    print(f"trained {steps_run} steps in {seconds:.1f} s on {mx.default_device()}: first step (with compile) "
          f"{first_step_s:.1f} s, then {rate:.2f} steps/s")
    return summary


def _weights_metadata(cfg: TrainConfig, step: int, split) -> dict:
    return {"model": "pocket", "trained_steps": step, "train_config": asdict(cfg),
            "data": {"source": "sklearn.datasets.load_digits", "latent": "8x8 -> nearest 2x -> x / 8 - 1, NHWC",
                     "train_size": int(split.train_labels.size), "test_size": int(split.test_labels.size)}}


def _read_log(path: Path, up_to_step: int) -> list[list[str]]:
    """Rows of an earlier run's loss log up to the resumed step (later rows are redone)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [row for row in rows if int(row[0]) <= up_to_step]


def main(argv: list[str] | None = None) -> dict:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, type=Path, help="weights file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--cond-dropout", type=float, default=defaults.cond_dropout)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--no-compile", action="store_true", help="run the training step eagerly")
    parser.add_argument("--resume", action="store_true", help="continue from the training state next to --out")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, ema_decay=args.ema_decay, cond_dropout=args.cond_dropout,
                      seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                      compile=not args.no_compile)
    summary = train(cfg, args.out, resume=args.resume)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
