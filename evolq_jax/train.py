"""Train a model from scratch (used to make the bundled fixtures).

AdamW with linear warm-up and cosine decay, random-crop (zero padding `pad`)
+ horizontal flip augmentation, optional label smoothing. The last epoch's
params are kept: no checkpoint is picked on the test set, which is only
reported. The whole training state (params, optimizer, both random streams,
the per-epoch record) is written after every epoch, so a killed run continues
with `resume=True` exactly where it stopped.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm.auto import tqdm

from evolq_jax.data import load_split
from evolq_jax.evaluate import batched, percent
from evolq_jax.models import get_preset, model_for
from evolq_jax.models.checkpoint import load_params, save_params
from evolq_jax.workdir import write_atomic, write_json

STATE_FILE, RECORD_FILE = "train_state.msgpack", "train_record.json"


def _augment(key, images, pad: int):
  """Random crop after zero padding by `pad`, and random horizontal flip."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k1, k2 = jax.random.split(key)
  offs = jax.random.randint(k1, (n, 2), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))
  out = crop(padded, offs)
  flip = jax.random.bernoulli(k2, 0.5, (n, 1, 1, 1))
  return jnp.where(flip, out[:, :, ::-1], out)


def make_steps(model, tx, augment: bool, pad: int = 2, label_smoothing: float = 0.0):
  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()

  @jax.jit
  def train_step(params, opt_state, key, images, labels):
    if augment:
      images = _augment(key, images, pad)
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, images):
    return jnp.argmax(model.apply({"params": params}, images), -1)

  return train_step, predict


def accuracy(predict, params, images, labels, batch_size=1000) -> float:
  return percent(batched(lambda x: predict(params, x), images, batch_size) == np.asarray(labels))


def _save_state(workdir, params, opt_state, key, rng, history, recipe):
  """Everything a resumed run needs; the record is written last and names the epoch."""
  state = {"params": params, "opt_state": opt_state, "key": jax.random.key_data(key)}
  write_atomic(os.path.join(workdir, STATE_FILE), serialization.to_bytes(state))
  record = {"epoch": len(history), "recipe": recipe, "rng": rng.bit_generator.state,
            "history": history}
  write_atomic(os.path.join(workdir, RECORD_FILE), json.dumps(record, indent=1).encode())


def _load_state(workdir, template, recipe):
  """-> (params, opt_state, key, rng, history) of the last finished epoch."""
  with open(os.path.join(workdir, RECORD_FILE)) as f:
    record = json.load(f)
  if record["recipe"] != recipe:
    diff = sorted(k for k in set(recipe) | set(record["recipe"])
                  if recipe.get(k) != record["recipe"].get(k))
    raise ValueError(f"cannot resume training in {workdir!r}: its recipe differs in {diff}. "
                     "Use the same config, or another --workdir.")
  with open(os.path.join(workdir, STATE_FILE), "rb") as f:
    state = serialization.from_bytes(template, f.read())
  rng = np.random.default_rng()
  rng.bit_generator.state = record["rng"]
  return (state["params"], state["opt_state"], jax.random.wrap_key_data(state["key"]), rng,
          record["history"])


def train(config, workdir: str, resume: bool = False) -> dict:
  cfg = get_preset(config.model)
  t = config.train
  x_train, y_train = load_split(config.data, "train", cfg)
  x_test, y_test = load_split(config.data, "test", cfg)
  model = model_for(cfg)
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
  train_step, predict = make_steps(model, tx, t.augment, t.get("pad", 2),
                                   t.get("label_smoothing", 0.0))
  rng = np.random.default_rng(t.seed)
  recipe = {"model": cfg.name, **t.to_dict(), "train_images": len(x_train)}
  history = []
  os.makedirs(workdir, exist_ok=True)
  if resume and os.path.exists(os.path.join(workdir, RECORD_FILE)):
    params, opt_state, key, rng, history = _load_state(
        workdir, {"params": params, "opt_state": opt_state, "key": jax.random.key_data(key)},
        recipe)
    print(f"resuming {workdir!r} after epoch {len(history)}", flush=True)
  elif os.path.exists(os.path.join(workdir, RECORD_FILE)):
    raise ValueError(f"{workdir!r} holds a training run: pass --resume to continue it, or "
                     "choose another --workdir.")
  start = time.time() - (history[-1]["seconds"] if history else 0.0)
  for epoch in range(len(history), t.epochs):
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
    _save_state(workdir, params, opt_state, key, rng, history, recipe)
  summary = {"model": cfg.name, "epochs": t.epochs, "test_top1": history[-1]["test_top1"],
             "seconds": history[-1]["seconds"], "recipe": t.to_dict(), "history": history}
  write_json(os.path.join(workdir, "train_summary.json"), summary)
  return summary
