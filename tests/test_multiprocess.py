"""A search over two processes (JAX's distributed runtime, CPU collectives) equals the
search in one process on one device: the population is sharded over the four devices of
two processes (two forced host devices each), so this also checks a population split
over several devices of one process (test_sharding checks the scoring programs)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(__file__)
LOCAL_DEVICES = 2  # per process of the two


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker(process_id: int, processes: int, port: int) -> dict:
  """One process of the run (processes=1: the reference, run in the test's own process)
  -> its result, as JSON types."""
  import jax
  if processes > 1:
    from evolq_jax.search.sharding import initialize_distributed
    initialize_distributed(f"localhost:{port}", processes, process_id)
  import dataclasses

  from evolq_jax.calibrate import calibrate
  from evolq_jax.config import QuantConfig
  from evolq_jax.models import get_preset, init_params
  from evolq_jax.search import SearchConfig, search
  local = LOCAL_DEVICES if processes > 1 else 1
  assert (jax.process_count(), len(jax.devices()), len(jax.local_devices())) == (
      processes, processes * local, local)
  cfg = dataclasses.replace(get_preset("vit_fixture_patch4_28"), depth=1)
  qcfg = QuantConfig(w_bits=3, a_bits=8)
  with jax.enable_x64(True):  # as in test_sharding: no value sits on a rounding boundary
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), init_params(cfg, jax.random.key(0)))
    x = np.asarray(jax.random.normal(jax.random.key(1), (24, 28, 28, 1)), np.float64)
    qparams = calibrate(cfg, qcfg, params, x, batch_size=12, progress=False)
    scfg = SearchConfig(passes=1, generations=2, children=5, loss_batch=12, devices=0)
    r = search(cfg, qcfg, params, qparams, x, scfg, seed=1, progress=False)
  return json.loads(json.dumps({
      "process": jax.process_index(), "devices": len(jax.devices()),
      "final": r.fitness_final, "history": r.history,
      "qparams": [np.asarray(a).tolist() for a in jax.tree.leaves(r.qparams)]}))


def _start(process_id, processes, port):
  code = (f"import sys; sys.path.insert(0, {HERE!r}); from test_multiprocess import _worker; "
          f"import json; print('RESULT ' + json.dumps(_worker({process_id}, {processes}, {port})))")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"}
  return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def _result(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


def test_two_processes_search_like_one():
  # one process, one device: this one, first, so that the two read its calibration program
  # from the compilation cache (the search's programs differ: theirs are sharded)
  one = _worker(0, 1, 0)
  port = _free_port()
  procs = [_start(i, 2, port) for i in range(2)]
  try:
    results = [_result(p) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [r["process"] for r in results] == [0, 1]
  assert [r["devices"] for r in results] == [2 * LOCAL_DEVICES] * 2 and one["devices"] == 1
  for r in results:  # every process ends with the one-process result, bit for bit
    assert r["final"] == one["final"]
    assert r["history"] == one["history"]
    assert r["qparams"] == one["qparams"]
  assert one["final"] < one["history"][0]["start"]  # the search did something


def test_cluster_scripts_parse_and_print_each_process_command():
  """The SLURM and TPU-pod launchers (only the local path can run here): bash syntax, and a
  dry run that prints the command each process would run."""
  root = os.path.join(HERE, "..")
  env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2",
         "TPU": "pod", "ZONE": "zone"}
  for script in ("scripts/slurm_search.sh", "scripts/tpu_pod_search.sh"):
    subprocess.run(["bash", "-n", script], cwd=root, check=True)
    out = subprocess.run(["bash", script, "configs/fixture_w3a8.py", "runs/x", "--set",
                          "search.passes=2"], cwd=root, env=env, check=True, capture_output=True,
                         text=True).stdout
    want = "evolq search --distributed --config configs/fixture_w3a8.py --workdir runs/x"
    assert want in out and "search.passes=2" in out, out
    if "slurm" in script:
      assert [l.split(" ")[1] for l in out.splitlines()] == ["0", "1", "2", "3"]
  bad = subprocess.run(["bash", "scripts/slurm_search.sh"], cwd=root, capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "usage" in bad.stderr
