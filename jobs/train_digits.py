"""Training recipe for the embedded digits DiT.

    python -m jobs.train_digits --out pipelines/weights/digits-dit

Seeded and step-counted (not time-boxed), so the same command on the same torch build gives the same
weights. The committed weights came from the defaults below; ``training.json`` next to them records the
exact arguments, the loss curve and the wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines import digits


def _disable_per_block_label_dropout(model: torch.nn.Module) -> None:
    # diffusers' DiT gives every block its own label embedder, each of which drops labels independently in
    # train mode. Classifier-free guidance needs one decision per sample, so we drop labels ourselves.
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    out: Path,
    steps: int = 2500,
    batch_size: int = 64,
    lr: float = 5e-4,
    warmup: int = 200,
    class_dropout: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    log_every: int = 100,
) -> dict:
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    images, labels = digits.load_digit_images()
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)

    model = DiTTransformer2DModel(**digits.TRANSFORMER_CONFIG)
    _disable_per_block_label_dropout(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_schedule = DDPMScheduler(**{k: v for k, v in digits.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas_cumprod = noise_schedule.alphas_cumprod
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    data_gen = torch.Generator().manual_seed(seed)
    losses: list[tuple[int, float]] = []
    running, started = 0.0, time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(images_t), (batch_size,), generator=data_gen)
        x0, y = images_t[idx], labels_t[idx].clone()
        y[torch.rand(batch_size, generator=data_gen) < class_dropout] = digits.NULL_CLASS
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=data_gen)
        noise = torch.randn(x0.shape, generator=data_gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - decay)

        running += loss.item()
        if (step + 1) % log_every == 0:
            losses.append((step + 1, running / log_every))
            elapsed = time.time() - started
            print(
                f"step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                f"{elapsed:.0f}s elapsed, ~{elapsed / (step + 1) * (steps - step - 1):.0f}s left",
                flush=True,
            )
            running = 0.0

    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    record = dict(
        steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, class_dropout=class_dropout,
        ema_decay=ema_decay, seed=seed, torch=torch.__version__, threads=torch.get_num_threads(),
        wall_seconds=round(time.time() - started, 1), loss_curve=losses,
        transformer_config=digits.TRANSFORMER_CONFIG, scheduler_config=digits.SCHEDULER_CONFIG,
    )
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=digits.WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    record = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"saved {args.out} after {record['wall_seconds']}s")


if __name__ == "__main__":
    main()
