"""Train a model from scratch (used to make the bundled Fashion-MNIST fixture).

AdamW with linear warm-up and cosine decay, random-crop (pad 2) + horizontal
flip augmentation. The last epoch's params are kept: no checkpoint is picked
on the test set, which is only reported.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from evolq_jax.data import load_split
from evolq_jax.models import VisionTransformer, get_preset
from evolq_jax.models.checkpoint import load_params, save_params

PAD = 2


def _augment(key, images):
  """Random crop after zero padding by PAD, and random horizontal flip."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  k1, k2 = jax.random.split(key)
  offs = jax.random.randint(k1, (n, 2), 0, 2 * PAD + 1)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))
  out = crop(padded, offs)
  flip = jax.random.bernoulli(k2, 0.5, (n, 1, 1, 1))
  return jnp.where(flip, out[:, :, ::-1], out)


def make_steps(model, tx, augment: bool):
  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(params, opt_state, key, images, labels):
    if augment:
      images = _augment(key, images)
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, images):
    return jnp.argmax(model.apply({"params": params}, images), -1)

  return train_step, predict


def accuracy(predict, params, images, labels, batch_size=1000) -> float:
  hits = sum(int(jnp.sum(predict(params, images[i:i + batch_size]) == labels[i:i + batch_size]))
             for i in range(0, len(images), batch_size))
  return 100.0 * hits / len(images)


def train(config, workdir: str) -> dict:
  cfg = get_preset(config.model)
  t = config.train
  x_train, y_train = load_split(config.data, "train", cfg)
  x_test, y_test = load_split(config.data, "test", cfg)
  model = VisionTransformer(config=cfg)
  key = jax.random.key(t.seed)
  key, init_key = jax.random.split(key)
  params = model.init(init_key, jnp.asarray(x_train[:1]))["params"]
  if t.get("init_checkpoint"):  # continue from earlier params (a second stage)
    params = load_params(t.init_checkpoint, cfg)
  steps_per_epoch = len(x_train) // t.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(x_train)} training images are fewer than one batch of "
                     f"train.batch_size={t.batch_size}.")
  warmup = t.warmup_epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(  # decay needs >= 1 step after warm-up
      0.0, t.lr, warmup, max(t.epochs * steps_per_epoch, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(t.clip),
                   optax.adamw(schedule, weight_decay=t.weight_decay))
  opt_state = tx.init(params)
  train_step, predict = make_steps(model, tx, t.augment)
  rng = np.random.default_rng(t.seed)
  os.makedirs(workdir, exist_ok=True)
  history, start = [], time.time()
  for epoch in range(t.epochs):
    order = rng.permutation(len(x_train))
    losses = []
    for i in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{t.epochs}", leave=False):
      idx = order[i * t.batch_size:(i + 1) * t.batch_size]
      key, step_key = jax.random.split(key)
      params, opt_state, loss = train_step(params, opt_state, step_key,
                                           jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
      losses.append(loss)
    rec = {"epoch": epoch + 1, "train_loss": float(np.mean(jax.device_get(losses))),
           "test_top1": accuracy(predict, params, x_test, y_test),
           "seconds": round(time.time() - start, 1)}
    history.append(rec)
    print(json.dumps(rec), flush=True)
    save_params(os.path.join(workdir, "params.safetensors"), params,
                {"model": cfg.name, "epoch": epoch + 1})
  summary = {"model": cfg.name, "epochs": t.epochs, "test_top1": history[-1]["test_top1"],
             "seconds": history[-1]["seconds"], "recipe": t.to_dict(), "history": history}
  with open(os.path.join(workdir, "train_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
